"""Redis goes away in the middle of a run and comes back: every row lands exactly once.

`straw run` (continuous) works against a private Redis (append-only, fsync
always) while rows keep arriving in the legacy table. The server is killed with
SIGKILL (a crash) or stopped cleanly, rows go on arriving and wait in the
outbox (`straw status` says how many, and why), then the same server restarts
on the same port and data directory, and straw catches up by itself.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import pytest
import redis
from sqlalchemy import Table, create_engine, insert
from sqlalchemy.engine import Engine

from adapters.db import position
from fixtures.legacy_orders import create_orders, order_rows
from straw.local_redis import RedisServer
from straw.records import event_id
from tests.crashes import REPO, SOURCE, assert_exactly_once, spawn_straw, straw_command, tail
from tests.helpers import orders_config, read_stream

pytestmark = pytest.mark.slow  # deselect with -m 'not slow'
STREAM = "outage.orders"  # the Redis is this test's alone


def add_orders(engine: Engine, table: Table, first: int, count: int) -> None:
    with engine.begin() as conn:
        conn.execute(insert(table), order_rows(count, first=first))


def wait_for(condition: Callable[[], bool], what: str, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}; straw's log ends:\n{tail(log)}"
        time.sleep(0.1)


def stream_length(url: str) -> int:
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    try:
        return int(client.xlen(STREAM))
    except redis.ConnectionError:
        return -1
    finally:
        client.close()


def straw_status(config: Path) -> str:
    done = subprocess.run(
        straw_command(config, "status"), cwd=REPO, capture_output=True, text=True, timeout=60,
        env={**os.environ, "COLUMNS": "400"},  # one line per row: nothing wrapped
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def waiting(status: str) -> int:
    found = re.search(r"(\d+) records waiting", status)
    assert found, status
    return int(found.group(1))


class Server(Protocol):
    """A private server a test may take down and bring back (same port, same data)."""

    def kill(self) -> None: ...
    def stop(self) -> None: ...
    def start(self) -> object: ...


def live_outage(
    config: Path, engine: Engine, table: Table, server: Server, outage: str, length: Callable[[], int], bus: str,
    down_for: float = 0.0,
) -> None:
    """`straw run` publishes 200 rows; more arrive; the bus goes down (`kill` or `stop`) for at least `down_for`
    seconds while rows keep arriving; `straw status` shows them waiting and why ("<bus> unreachable"); the bus
    comes back and all 1,450 rows land; SIGTERM ends straw cleanly. `length()` is the stream's, -1 while down."""
    logged = config.parent / "straw.log"
    with logged.open("ab") as log:
        proc = spawn_straw(config, log)
        try:
            wait_for(lambda: length() == 200, "the first 200 rows", logged)
            add_orders(engine, table, 201, 100)
            time.sleep(0.2)  # rows keep arriving while straw polls
            add_orders(engine, table, 301, 1000)
            time.sleep(0.05)  # the outage lands while straw polls and publishes these
            server.kill() if outage == "kill" else server.stop()
            down_at = time.monotonic()

            for first in (1301, 1351):
                add_orders(engine, table, first, 50)
                time.sleep(0.2)
            status = ""

            def outbox_holds_them() -> bool:
                nonlocal status
                status = straw_status(config)
                return waiting(status) >= 100 and f"{bus} unreachable" in status

            wait_for(outbox_holds_them, "`straw status` to show records waiting and why", logged, timeout=30)
            print(status)
            assert length() == -1, f"{bus} should still be down"
            time.sleep(max(0.0, down_for - (time.monotonic() - down_at)))

            server.start()  # same port, same data directory
            add_orders(engine, table, 1401, 50)
            wait_for(lambda: length() == 1450, "all 1450 rows in the stream after the restart", logged)
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    engine.dispose()
    assert code == 0, f"straw exited with {code} after SIGTERM:\n{tail(logged)}"


@pytest.mark.parametrize("outage", ["kill", "stop"])
def test_rows_wait_in_the_outbox_while_redis_is_down_and_land_once(
    outage: str, tmp_path: Path, sqlite_url: str, private_redis: RedisServer
) -> None:
    engine = create_engine(sqlite_url)
    table = create_orders(engine, 200)
    config = orders_config(
        tmp_path, db_url=sqlite_url, redis_url=private_redis.url, stream=STREAM, batch_size=50, relay_batch_size=100
    )
    url = private_redis.url
    live_outage(config, engine, table, private_redis, outage, lambda: stream_length(url), "redis")

    client = redis.Redis.from_url(url)
    try:
        entries = read_stream(client, STREAM)
    finally:
        client.close()
    expected = {event_id(SOURCE, str(n), position.encode((n,))) for n in range(1, 1451)}
    assert_exactly_once(entries, expected)
    assert [int(e["event"]["subject"]) for e in entries] == list(range(1, 1451))
    after = straw_status(config)
    assert waiting(after) == 0 and "redis unreachable" not in after
