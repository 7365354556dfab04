"""The bus loses acknowledged writes; straw notices, re-publishes from the outbox, or stops on a gap.

Through the real CLI against private redis-server instances: a restart from an
older RDB snapshot, and a failover to a replica that had not received the last
publish (its link to the primary cut first, so the lag is certain, not a race). The stream
must end with every source row exactly once, in seq order; what the outbox no
longer retains is never published over.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
import yaml
from sqlalchemy import Table, create_engine, insert
from sqlalchemy.engine import Engine

from adapters.db import position
from fixtures.legacy_orders import create_orders, order_rows
from straw.local_redis import RedisServer, free_port, start_private_redis
from straw.records import event_id
from tests.crashes import REPO, SOURCE, assert_exactly_once, straw_command
from tests.helpers import orders_config, read_stream

pytestmark = pytest.mark.slow  # private servers and several `straw run --once` each
STREAM = "rollback.orders"  # the Redis servers are this test's alone


def straw(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        straw_command(config, *args), cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "COLUMNS": "400"},
    )


def add_orders(engine: Engine, table: Table, first: int, count: int) -> None:
    with engine.begin() as conn:
        conn.execute(insert(table), order_rows(count, first=first))


def expected(count: int) -> set[str]:
    return {event_id(SOURCE, str(n), position.encode((n,))) for n in range(1, count + 1)}


def in_order(entries: list[dict[str, Any]]) -> list[int]:
    """The order numbers along the stream."""
    return [int(e["event"]["subject"]) for e in entries]


def rewrite(config: Path, **changes: Any) -> None:
    """Change top-level sections of the YAML (e.g. move `redis:` to `bus:`)."""
    document = yaml.safe_load(config.read_text())
    for key, value in changes.items():
        if value is None:
            document.pop(key, None)
        else:
            document[key] = value
    config.write_text(yaml.safe_dump(document, sort_keys=False))


def stream_status(config: Path) -> dict[str, Any]:
    done = straw(config, "status", "--json")
    assert done.returncode == 0, done.stderr
    rows: list[dict[str, Any]] = orjson.loads(done.stdout)["streams"]
    return next(row for row in rows if row["stream"] == STREAM)


def run_ok(config: Path) -> str:
    done = straw(config, "run", "--once")
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stderr


@contextmanager
def orders_on_private_redis(
    tmp_path: Path, sqlite_url: str, rows: int, relay_batch_size: int
) -> Iterator[tuple[RedisServer, redis.Redis, Engine, Table, Path]]:
    """A legacy ORDERS table of `rows`, a private Redis (RDB only: SAVE is the snapshot) and a config."""
    server = start_private_redis(tmp_path / "redis", persist=False)
    client = redis.Redis.from_url(server.url)
    try:
        engine = create_engine(sqlite_url)
        table = create_orders(engine, rows)
        config = orders_config(tmp_path, db_url=sqlite_url, redis_url=server.url, stream=STREAM,
                               relay_batch_size=relay_batch_size)
        yield server, client, engine, table, config
    finally:
        client.close()
        server.kill()


def restart_from_snapshot(server: RedisServer, client: redis.Redis, config: Path, more: Callable[[], None]) -> None:
    """Publish what the source holds, snapshot (SAVE), add `more` and publish it, then restart Redis from the
    snapshot: the stream and its checkpoint go back to the first run's, the outbox remembers the second."""
    run_ok(config)
    client.save()
    more()
    run_ok(config)
    client.close()  # its pooled connection dies with the server; the next command opens a new one
    server.kill()
    server.start()


def test_a_restart_from_an_older_snapshot_is_repaired_from_the_outbox(tmp_path: Path, sqlite_url: str) -> None:
    """The issue's scenario: 500 published, snapshot, 500 more, restart from the snapshot, 100 new."""
    with orders_on_private_redis(tmp_path, sqlite_url, 500, 200) as (server, client, engine, table, config):
        restart_from_snapshot(server, client, config, lambda: add_orders(engine, table, 501, 500))
        assert client.xlen(STREAM) == 500
        add_orders(engine, table, 1001, 100)

        log = run_ok(config)

        entries = read_stream(client, STREAM)
        assert_exactly_once(entries, expected(1100))
        assert in_order(entries) == list(range(1, 1101))
        assert "bus rolled back: re-publishing the lost range from the outbox" in log
        assert "bus_seq=500" in log and "published_seq=1000" in log
        assert "bus rollback repaired" in log
        status = stream_status(config)
        assert status["rollback"].startswith("bus checkpoint seq 500 below published seq 1000: "
                                             "re-published seq 501..1000 at ")
        assert status["error"] is None and status["backlog"] == 0
        assert status["retained"]["records"] == 1100  # the default retention keeps all of it


def start_replica(directory: Path, primary: RedisServer) -> RedisServer:
    replica = start_private_redis(directory, persist=False)
    client = redis.Redis.from_url(replica.url)
    client.replicaof("127.0.0.1", primary.port)
    deadline = time.monotonic() + 30
    while client.info("replication").get("master_link_status") != "up":
        assert time.monotonic() < deadline, "the replica did not connect to the primary"
        time.sleep(0.05)
    client.close()
    return replica


def caught_up(primary: redis.Redis) -> bool:
    info = primary.info("replication")
    return bool(info.get("slave0", {}).get("offset", -1) >= info["master_repl_offset"])


@pytest.mark.parametrize("durability", ["ack", "replicated"])
def test_failover_to_a_lagging_replica(durability: str, tmp_path: Path, sqlite_url: str) -> None:
    """Primary killed right after a publish its replica never got; the replica is promoted.

    Default (`ack`): the publish counted, the rollback is found and repaired. `replicated`:
    the publish waits for the replica (which has lost its link), so it never counts: nothing to repair.
    """
    primary = start_private_redis(tmp_path / "primary", persist=False)
    replica = start_replica(tmp_path / "replica", primary)
    to_primary, to_replica = redis.Redis.from_url(primary.url), redis.Redis.from_url(replica.url)
    spare: RedisServer | None = None
    try:
        engine = create_engine(sqlite_url)
        table = create_orders(engine, 200)
        config = orders_config(tmp_path, db_url=sqlite_url, redis_url=primary.url, stream=STREAM,
                               relay_batch_size=100)
        bus = {"url": primary.url, "durability": durability, "replicas": 1, "durability_timeout": "500ms"}
        rewrite(config, redis=None, bus=bus)
        run_ok(config)
        deadline = time.monotonic() + 30
        while not caught_up(to_primary):
            assert time.monotonic() < deadline, "the replica did not catch up"
            time.sleep(0.05)

        # The replica loses its link (it now follows a port where nothing listens): it stays a replica,
        # keeps what it has, and does not see what comes next.
        to_replica.replicaof("127.0.0.1", free_port())
        add_orders(engine, table, 201, 100)
        ran = straw(config, "run", "--once", "--wait", "2")
        if durability == "ack":
            assert ran.returncode == 0, ran.stderr
            assert to_primary.xlen(STREAM) == 300
        else:  # no replica confirms: the relay does not even start publishing; the records wait in the outbox
            assert ran.returncode == 1
            assert "bus.durability replicated: 0 of 1 replicas" in ran.stderr
            assert "100 records wait in the outbox" in ran.stderr
            assert to_primary.xlen(STREAM) == 200
        primary.kill()
        to_replica.replicaof("NO", "ONE")
        assert to_replica.xlen(STREAM) == 200
        if durability == "replicated":  # the new primary gets a replica of its own to confirm publishes
            spare = start_replica(tmp_path / "spare", replica)

        add_orders(engine, table, 301, 50)
        rewrite(config, bus={**bus, "url": replica.url})
        log = run_ok(config)

        entries = read_stream(to_replica, STREAM)
        assert_exactly_once(entries, expected(350))
        assert in_order(entries) == list(range(1, 351))
        status = stream_status(config)
        if durability == "ack":
            assert "bus_seq=200" in log and "published_seq=300" in log
            assert "re-published seq 201..300" in status["rollback"]
        else:
            assert "rolled back" not in log
            assert status["rollback"] is None
    finally:
        to_primary.close()
        to_replica.close()
        for server in (primary, replica, spare):
            if server is not None:
                server.kill()


def test_a_rollback_beyond_the_retention_stops_the_stream_until_replayed(tmp_path: Path, sqlite_url: str) -> None:
    with orders_on_private_redis(tmp_path, sqlite_url, 300, 100) as (server, client, engine, table, config):
        document = yaml.safe_load(config.read_text())
        rewrite(config, outbox={**document["outbox"], "retain": {"records": 100}})  # the newest batch only
        restart_from_snapshot(server, client, config, lambda: add_orders(engine, table, 301, 300))
        assert client.xlen(STREAM) == 300
        add_orders(engine, table, 601, 50)

        for _ in range(2):  # and it stays stopped: a second run does not carry on either
            ran = straw(config, "run", "--once")
            assert ran.returncode == 1
            assert "Traceback" not in ran.stderr
            assert (f"stream '{STREAM}': the bus lost published records (its checkpoint is at seq 300, this outbox "
                    "published up to seq 600) and seq 301..500 is no longer retained") in ran.stderr
            assert f"run `straw reread {STREAM}`" in ran.stderr
            assert client.xlen(STREAM) == 300, "published over the gap"
        status = stream_status(config)
        assert status["rollback"] == "bus checkpoint seq 300 below published seq 600: seq 301..500 not retained, " \
                                     "stream stopped"
        assert "seq 301..500 is no longer retained" in status["error"]

        replayed = straw(config, "reread", STREAM)
        assert replayed.returncode == 0, replayed.stderr
        assert "dropped 150 records above seq 300" in replayed.stdout
        assert f"orders: from position {position.encode((300,))}" in replayed.stdout
        run_ok(config)

        entries = read_stream(client, STREAM)
        assert_exactly_once(entries, expected(650))  # the same ids: replayed, not invented
        assert in_order(entries) == list(range(1, 651))
        assert stream_status(config)["error"] is None
