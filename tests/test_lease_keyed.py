"""Keyed state across takeovers: a snapshot source and a key sweep on a stream that changes hands.

The new holder rebuilds each key's state from the stream (`straw/handover.py`): its first
listing sends no unchanged row again and reports every row deleted in the gap, once.
These tests drive two outboxes step by step on one Redis (the soak with `straw run`
processes killed with SIGKILL is `test_keyed_pair_survives_kill_nine_takeovers`).
"""

from __future__ import annotations

import json
import random
import signal
import sqlite3
import threading
import time
from collections import Counter
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
import redis
import structlog
import yaml

from bus.redis import RedisBus, checkpoint_key
from outbox import handover
from outbox.relay import Relay, adopt_streams
from outbox.store import Outbox
from straw.config import Config, LeaseSpec
from straw.config_load import load_config
from straw.handover import handed
from straw.lease import Leases, drop_fenced, lease_key
from straw.records import source_uri
from straw.runner import Pipeline, build_pipeline, poll, sweep_deletes
from tests.test_lease import POLL, TTL, Pair, start_pair, wait_for

SNAP, SWEPT = source_uri("pair", "snap"), source_uri("pair", "ts")


def legacy(path: Path) -> str:
    """SNAP (listed whole: snapshot) and TS (read by CHANGED_AT, hard deletes found by the key sweep)."""
    with closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE SNAP (ID INTEGER PRIMARY KEY, V TEXT NOT NULL)")
        db.execute("CREATE TABLE TS (ID INTEGER PRIMARY KEY, V TEXT NOT NULL, CHANGED_AT DATETIME NOT NULL)")
        db.commit()
    return f"sqlite:///{path}"


def keyed_config(directory: Path, name: str, *, db_url: str, redis_url: str, stream: str,
                 ttl: float = 60.0, poll_interval: float = 0.05, batch_size: int = 4) -> Path:
    """One instance of a pair with both kinds of keyed state on one stream."""
    item = {"key": ["id"], "fields": {"id": "integer", "v": "string"}}
    config = {
        "instance": "pair",
        "redis": {"url": redis_url},
        "outbox": {"path": str(directory / f"outbox-{name}.db")},
        "relay": {"batch_size": 500, "idle_interval": 0.02, "backoff_max": 0.5},
        "lease": {"ttl": ttl, "node": name},
        "entities": {"item": item},
        "sources": [
            {"name": "snap", "url": db_url, "table": "SNAP", "mode": "snapshot", "entity": "item",
             "stream": stream, "mapping": {"id": "ID", "v": "V"}, "batch_size": batch_size,
             "poll_interval": poll_interval},
            {"name": "ts", "url": db_url, "table": "TS", "mode": "timestamp", "timestamp_column": "CHANGED_AT",
             "key_column": "ID", "settle": "off", "entity": "item", "stream": stream,
             "mapping": {"id": "ID", "v": "V"}, "batch_size": batch_size, "poll_interval": poll_interval,
             "deletes": {"sweep_interval": 0}},
        ],
    }
    path = directory / f"straw-{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class Table:
    """The legacy tables, changed by hand between polls."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tick = 0

    def run(self, *statements: tuple[str, tuple[Any, ...]]) -> None:
        with closing(sqlite3.connect(self.path)) as db:
            for sql, args in statements:
                db.execute(sql, args)
            db.commit()

    def put(self, table: str, key: int, value: str) -> None:
        if table == "SNAP":
            self.run(("INSERT OR REPLACE INTO SNAP (ID, V) VALUES (?, ?)", (key, value)))
        else:
            self.tick += 1  # every write moves CHANGED_AT on: the timestamp source reads it
            self.run(("INSERT OR REPLACE INTO TS (ID, V, CHANGED_AT) VALUES (?, ?, ?)",
                      (key, value, f"2027-01-01 00:{self.tick // 60:02d}:{self.tick % 60:02d}.000000")))

    def drop(self, table: str, key: int) -> None:
        self.run((f"DELETE FROM {table} WHERE ID = ?", (key,)))

    def rows(self, table: str) -> dict[str, str]:
        with closing(sqlite3.connect(self.path)) as db:
            return {str(k): v for k, v in db.execute(f"SELECT ID, V FROM {table}")}


class Node:
    """One instance of the pair, driven by hand: take the lease, poll, publish."""

    def __init__(self, client: redis.Redis, config: Config, stream: str) -> None:
        self.client, self.config, self.stream = client, config, stream
        assert config.lease is not None
        self.outbox = Outbox(config.outbox.path)
        self.leases = Leases(client, LeaseSpec(ttl=60, node=config.lease.node), [stream])
        self.pipelines: list[Pipeline] = [build_pipeline(config, spec) for spec in config.sources]
        adopt_streams(RedisBus(client), self.outbox, [stream])
        self.clock = time.monotonic()

    def take(self, other: Node | None = None) -> None:
        """The lease lapses (the other holder is gone) and this node claims the stream."""
        self.client.delete(lease_key(self.stream))
        if other is not None:
            other.leases.renew()  # the old holder's renewer finds it lost
            assert not other.leases.holds(self.stream)
        self.clock += 120
        assert self.leases.tick(self.clock)[0] == [self.stream]
        drop_fenced(self.client, self.outbox, [self.stream])
        assert self.leases.claim(self.outbox, self.stream, handed(self.config, self.config.sources))

    def poll(self, *, once: bool = False, publish: bool = True) -> None:
        """Each source once (`once`: the snapshot stops after its first batch, a listing cut short)."""
        for pipeline in self.pipelines:
            sweep_deletes(pipeline, self.outbox)
            poll(pipeline, self.outbox, stop=(lambda: True) if once and pipeline.spec.name == "snap" else None)
        if publish:
            Relay(RedisBus(self.client), self.outbox).publish(self.stream)

    def close(self) -> None:
        self.outbox.close()
        for pipeline in self.pipelines:
            pipeline.source.close()


class Stream:
    """What the stream says, read from where the last look ended."""

    def __init__(self, client: redis.Redis, stream: str) -> None:
        self.client, self.stream, self.after = client, stream, "-"

    def all(self) -> list[tuple[str, str, str, str | None]]:
        return self._read("-")

    def new(self) -> list[tuple[str, str, str, str | None]]:
        """(source, op, key, v) of each event since the last call."""
        found = self._read(self.after)
        entries = self.client.xrevrange(self.stream, count=1)
        if entries:
            self.after = "(" + entries[0][0].decode()
        return found

    def _read(self, start: str) -> list[tuple[str, str, str, str | None]]:
        out = []
        for _id, fields in self.client.xrange(self.stream, min=start):
            try:
                event = json.loads(fields[b"event"])
                event["subject"]
            except (KeyError, ValueError):
                continue  # an entry written by hand (an attack below)
            op = event["type"].rsplit(".", 1)[1]
            out.append(("snap" if event["source"] == SNAP else "ts", op, event["subject"],
                        event["data"].get("v") if op == "upserted" else None))
        return out


def final_state(events: list[tuple[str, str, str, str | None]], source: str) -> dict[str, str]:
    state: dict[str, str] = {}
    for src, op, key, value in events:
        if src != source:
            continue
        if op == "deleted":
            assert key in state, f"{source}: delete of {key}, which the stream does not hold"
            del state[key]
        else:
            assert value is not None
            state[key] = value
    return state


def no_resends(events: list[tuple[str, str, str, str | None]]) -> None:
    """No key's event repeats its previous one: an unchanged row is not sent again, a delete once."""
    last: dict[tuple[str, str], tuple[str, str | None]] = {}
    for src, op, key, value in events:
        assert last.get((src, key)) != (op, value), f"{src} {key}: {op} {value} sent again"
        last[(src, key)] = (op, value)


@pytest.fixture
def pair(tmp_path: Path, redis_client: redis.Redis, redis_url: str, stream_name: str) -> Any:
    db_url = legacy(tmp_path / "legacy.db")
    nodes = {name: Node(redis_client, load_config(keyed_config(tmp_path, name, db_url=db_url, redis_url=redis_url,
                                                               stream=stream_name)), stream_name)
             for name in ("a", "b")}
    yield nodes["a"], nodes["b"], Table(tmp_path / "legacy.db"), Stream(redis_client, stream_name)
    for node in nodes.values():
        node.close()
    redis_client.delete(lease_key(stream_name), checkpoint_key(stream_name))


@pytest.mark.parametrize("step", [handover.STEP, 2])  # 2: the state is written over many short transactions
def test_takeovers_send_each_change_once_and_every_delete_of_the_gap(
    pair: Any, step: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(handover, "STEP", step)
    a, b, table, stream = pair
    for key in range(1, 11):
        table.put("SNAP", key, f"s{key}")
        table.put("TS", key, f"t{key}")
    a.take()
    a.poll()
    a.poll()  # the key sweep's first run: it compares what the first poll delivered
    assert Counter((s, op) for s, op, _k, _v in stream.new()) == {("snap", "upserted"): 10, ("ts", "upserted"): 10}

    # The gap: changes made while a is gone and b not yet polling.
    table.put("SNAP", 2, "s2'")
    table.drop("SNAP", 3)
    table.put("SNAP", 11, "s11")
    table.put("TS", 2, "t2'")
    table.drop("TS", 3)
    table.put("TS", 11, "t11")
    b.take(a)
    b.poll()
    b.poll()
    assert sorted(stream.new()) == sorted([
        ("snap", "upserted", "2", "s2'"), ("snap", "deleted", "3", None), ("snap", "upserted", "11", "s11"),
        ("ts", "upserted", "2", "t2'"), ("ts", "deleted", "3", None), ("ts", "upserted", "11", "t11"),
    ])
    b.poll()
    assert stream.new() == []

    # A key whose last event is a delete comes back with the data it had: a's own outbox still holds the
    # old row as delivered, the stream says deleted: it is sent again (and the change b made to 2 is not).
    table.put("SNAP", 3, "s3")
    table.put("TS", 3, "t3")
    a.take(b)
    a.poll()
    a.poll()
    assert sorted(stream.new()) == [("snap", "upserted", "3", "s3"), ("ts", "upserted", "3", "t3")]

    events = stream.all()
    no_resends(events)
    assert final_state(events, "snap") == table.rows("SNAP")
    assert final_state(events, "ts") == table.rows("TS")


def test_a_takeover_in_the_middle_of_a_listing_starts_a_new_one(pair: Any) -> None:
    a, b, table, stream = pair
    for key in range(1, 12):
        table.put("SNAP", key, f"s{key}")
    a.take()
    a.poll()
    stream.new()
    # Batches of 4: a lists keys 1-4, publishes the change to 1 and dies before 5-11.
    for key in (1, 5, 9):
        table.put("SNAP", key, f"s{key}'")
    table.drop("SNAP", 10)
    a.poll(once=True)
    assert stream.new() == [("snap", "upserted", "1", "s1'")]
    assert a.outbox.position("snap") is not None and len(json.loads(a.outbox.position("snap"))) == 2  # mid-listing
    b.take(a)
    b.poll()
    # b's listing is whole: 1-4 are not deleted for want of being listed, 1 is not sent again.
    assert sorted(stream.new()) == [("snap", "deleted", "10", None), ("snap", "upserted", "5", "s5'"),
                                    ("snap", "upserted", "9", "s9'")]
    b.poll()
    assert stream.new() == []
    events = stream.all()
    no_resends(events)
    assert final_state(events, "snap") == table.rows("SNAP")


def test_a_fenced_change_is_sent_by_the_new_holder_and_not_forgotten_by_the_old(pair: Any) -> None:
    a, b, table, stream = pair
    for key in range(1, 6):
        table.put("SNAP", key, f"s{key}")
    a.take()
    a.poll()
    stream.new()
    table.put("SNAP", 4, "s4'")
    table.drop("SNAP", 5)
    a.poll(publish=False)  # frozen before its relay published: its outbox holds both, as delivered
    b.take(a)
    b.poll()
    assert sorted(stream.new()) == [("snap", "deleted", "5", None), ("snap", "upserted", "4", "s4'")]
    table.put("SNAP", 4, "s4")  # back to what a had before its fenced change
    a.take(b)  # a's outbox held 4 as s4' (never published by a): the stream says s4' too, so s4 is a change
    a.poll()
    assert stream.new() == [("snap", "upserted", "4", "s4")]
    events = stream.all()
    no_resends(events)
    assert final_state(events, "snap") == table.rows("SNAP")


@pytest.mark.parametrize("step", [handover.STEP, 2])
def test_a_trimmed_stream_resends_rather_than_misses_a_delete(
    pair: Any, redis_client: redis.Redis, step: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(handover, "STEP", step)
    a, b, table, stream = pair
    for key in range(1, 9):
        table.put("SNAP", key, f"s{key}")
        table.put("TS", key, f"t{key}")
    a.take()
    a.poll()
    a.poll()
    b.take(a)
    b.poll()
    table.put("SNAP", 8, "s8'")
    b.poll()
    stream.new()
    # Retention drops all but the last event (the change to 8): the other keys' events are gone.
    redis_client.xtrim(a.stream, maxlen=1, approximate=False)
    table.drop("SNAP", 1)
    table.drop("SNAP", 8)
    table.drop("TS", 2)
    with structlog.testing.capture_logs() as logs:
        a.take(b)
    assert any("the stream was trimmed" in str(entry.get("event")) for entry in logs), logs
    taken = [entry for entry in logs if entry.get("event") == "took over stream"]
    assert taken and taken[0]["keyed_state_exact"] is False, logs
    a.poll()
    a.poll()
    new = stream.new()
    # Every delete made in the gap is published: 8 from the stream, 1 and 2 from a's own outbox (a delivered
    # them); rows whose events were trimmed are sent again once, the unchanged row 8 knew is not.
    deleted = sorted((s, k) for s, op, k, _v in new if op == "deleted")
    assert deleted == [("snap", "1"), ("snap", "8"), ("ts", "2")], new
    resent = Counter((s, k) for s, op, k, _v in new if op == "upserted")
    assert set(resent.values()) == {1} and ("snap", "8") not in resent
    a.poll()
    assert stream.new() == []


class Changes(threading.Thread):
    """Inserts, updates and hard-deletes rows of both tables (and brings deleted keys back), until stopped.

    Every write carries a value never written before, so an event equal to its key's previous one is a
    row sent again, never a real change.
    """

    def __init__(self, table: Table) -> None:
        super().__init__(daemon=True)
        self.table, self.halt, self.count = table, threading.Event(), 0

    def run(self) -> None:
        rng = random.Random(11)
        alive: dict[str, set[int]] = {"SNAP": set(), "TS": set()}
        gone: dict[str, list[int]] = {"SNAP": [], "TS": []}
        next_key = 1
        while not self.halt.wait(0.01):
            name = rng.choice(("SNAP", "TS"))
            choice = rng.random()
            self.count += 1
            if len(alive[name]) < 20 or choice < 0.35:
                key, next_key = next_key, next_key + 1
            elif choice < 0.45 and gone[name]:
                key = gone[name].pop(0)  # a deleted key comes back
            elif choice < 0.8:
                key = rng.choice(sorted(alive[name]))
            else:
                key = rng.choice(sorted(alive[name]))
                self.table.drop(name, key)
                alive[name].discard(key)
                gone[name].append(key)
                continue
            self.table.put(name, key, f"{name[0].lower()}{self.count}")
            alive[name].add(key)


@pytest.mark.slow  # six takeovers by process kills and restarts: about a minute on a loaded machine
def test_keyed_pair_survives_kill_nine_takeovers(
    tmp_path: Path, redis_client: redis.Redis, redis_url: str, stream_name: str
) -> None:
    db_url = legacy(tmp_path / "legacy.db")
    configs = {name: keyed_config(tmp_path, name, db_url=db_url, redis_url=redis_url, stream=stream_name,
                                  ttl=TTL, poll_interval=POLL, batch_size=7) for name in ("a", "b")}
    table = Table(tmp_path / "legacy.db")
    pair = Pair(tmp_path, configs)
    changes = Changes(table)
    stream = Stream(redis_client, stream_name)
    takeovers = 0
    try:
        holder = start_pair(pair, redis_client, stream_name)
        changes.start()
        wait_for(lambda: redis_client.xlen(stream_name) > 30, 30, pair, "first changes published")
        for _round in range(6):
            active = holder()
            assert active in ("a", "b"), pair.tails()
            killed = pair.procs[active].pid
            pair.signal(active, signal.SIGKILL)
            # Restarted only once the standby holds: a restart may otherwise win the lapsed lease back (its own
            # checkpoint, so no handover at all), and this test is about handovers.
            standby = "b" if active == "a" else "a"
            wait_for(lambda s=standby: holder() == s, 15, pair, f"{standby} taking over from {active}", revive=False)
            takeovers += 1
            wait_for(lambda a=active, k=killed: pair.procs[a].pid != k, 15, pair, f"{active} restarted")
            before = redis_client.xlen(stream_name)
            wait_for(lambda b=before: redis_client.xlen(stream_name) > b, 15, pair, "the new holder publishing")
    finally:
        changes.halt.set()
        changes.join(timeout=10)
    try:
        wanted = {"snap": table.rows("SNAP"), "ts": table.rows("TS")}
        wait_for(lambda: all(final_state(stream.all(), s) == rows for s, rows in wanted.items()), 60, pair,
                 "the stream catching up with the tables")
        time.sleep(3 * POLL + 0.5)  # a few more listings and sweeps: they must add nothing
        events = stream.all()
    finally:
        pair.close()
    no_resends(events)
    for source, rows in wanted.items():
        assert final_state(events, source) == rows
    took = sum(pair.count(name, "keyed_state_exact=True") + pair.count(name, '"keyed_state_exact": true')
               for name in configs)
    assert takeovers == 6 and took >= 6, (took, pair.tails())
    assert changes.count > 200
    ops = Counter((s, op) for s, op, _k, _v in events)
    assert all(ops[(s, "deleted")] > 5 for s in ("snap", "ts")), ops


def test_a_takeover_cut_short_while_reading_the_stream_is_done_at_the_next_claim(
    pair: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b, table, stream = pair
    for key in range(1, 9):
        table.put("SNAP", key, f"s{key}")
    a.take()
    a.poll()
    stream.new()
    table.put("SNAP", 2, "s2'")
    table.drop("SNAP", 3)
    pages = [0]
    real = redis.Redis.xrange

    def failing(self: redis.Redis, name: str, *args: Any, **kwargs: Any) -> Any:
        pages[0] += 1
        if pages[0] == 2:  # the connection drops in the middle of the stream
            raise redis.ConnectionError("connection lost")
        return real(self, name, *args, **kwargs)

    monkeypatch.setattr(redis.Redis, "xrange", failing)
    with pytest.raises(redis.ConnectionError):
        b.take(a)  # the claim moved the checkpoint; the takeover did not commit
    monkeypatch.setattr(redis.Redis, "xrange", real)
    assert b.outbox.owes_take_over(b.stream)
    # The next claim finds the checkpoint its own already, and still takes over.
    assert b.leases.claim(b.outbox, b.stream, handed(b.config, b.config.sources))
    assert not b.outbox.owes_take_over(b.stream)
    b.poll()
    assert sorted(stream.new()) == [("snap", "deleted", "3", None), ("snap", "upserted", "2", "s2'")]


def test_a_takeover_over_tls_as_an_acl_user_rebuilds_from_the_stream(tmp_path: Path) -> None:
    """The lease and the stream read of a takeover need no more than the README's ACL grant (with the lease keys)."""
    from fixtures.tls_redis import PASSWORD, start_tls_redis
    from tests.test_cli import run_straw

    stream_name = "tls.keyed"
    server = start_tls_redis(tmp_path / "redis", f"~{stream_name} ~straw:ckpt:* ~straw:lease:*")
    try:
        db_url = legacy(tmp_path / "legacy.db")
        table = Table(tmp_path / "legacy.db")
        for key in range(1, 6):
            table.put("SNAP", key, f"s{key}")
        paths = {name: keyed_config(tmp_path, name, db_url=db_url, redis_url=server.url(), stream=stream_name)
                 for name in ("a", "b")}
        client = redis.Redis.from_url(server.url())
        stream = Stream(client, stream_name)
        first = run_straw("run", "--once", "--config", str(paths["a"]))  # takes the lease, releases it at the end
        assert first.returncode == 0, first.stderr
        assert Counter(op for _s, op, _k, _v in stream.new()) == {"upserted": 5}
        table.put("SNAP", 2, "s2'")
        table.drop("SNAP", 4)
        second = run_straw("run", "--once", "--config", str(paths["b"]))
        assert second.returncode == 0, second.stderr
        assert "keyed_state_exact" in second.stdout + second.stderr
        assert sorted(stream.new()) == [("snap", "deleted", "4", None), ("snap", "upserted", "2", "s2'")]
        assert PASSWORD not in first.stdout + first.stderr + second.stdout + second.stderr
        client.close()
    finally:
        server.stop()


def test_entries_that_are_not_straw_events_are_skipped_and_said(pair: Any, redis_client: redis.Redis) -> None:
    a, b, table, stream = pair
    for key in range(1, 4):
        table.put("SNAP", key, f"s{key}")
    a.take()
    a.poll()
    stream.new()
    redis_client.xadd(a.stream, {"note": "written by hand"})
    redis_client.xadd(a.stream, {"event": b"\xff not json"})
    redis_client.xadd(a.stream, {"event": json.dumps({"source": SNAP, "type": "item.upserted"})})  # no subject
    table.drop("SNAP", 2)
    with structlog.testing.capture_logs() as logs:
        b.take(a)
    assert [e["entries"] for e in logs if "not straw events" in str(e.get("event"))] == [3], logs
    b.poll()
    assert [e for e in stream.new() if e[0] == "snap"] == [("snap", "deleted", "2", None)]


def test_a_takeover_cut_short_while_writing_its_state_is_redone_whole(
    pair: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from outbox import keyed

    monkeypatch.setattr(handover, "STEP", 2)
    a, b, table, stream = pair
    for key in range(1, 9):
        table.put("SNAP", key, f"s{key}")
    b.take()  # b knew every key once: the redo must not trust what it has then
    b.poll()
    a.take(b)
    table.put("SNAP", 2, "s2'")
    table.drop("SNAP", 6)
    a.poll()
    stream.new()
    table.put("SNAP", 3, "s3'")
    table.drop("SNAP", 7)
    calls = [0]
    real = keyed.restore

    def failing(*args: Any, **kwargs: Any) -> None:
        calls[0] += 1
        if calls[0] == 2:  # one range of keys written and committed, then the disk fails
            raise sqlite3.OperationalError("disk I/O error")
        real(*args, **kwargs)

    monkeypatch.setattr(keyed, "restore", failing)
    with pytest.raises(Exception, match="disk I/O error"):
        b.take(a)
    monkeypatch.setattr(keyed, "restore", real)
    assert b.outbox.owes_take_over(b.stream)
    assert b.leases.claim(b.outbox, b.stream, handed(b.config, b.config.sources))
    b.poll()
    assert sorted(stream.new()) == [("snap", "deleted", "7", None), ("snap", "upserted", "3", "s3'")]
    events = stream.all()
    no_resends(events)
    assert final_state(events, "snap") == table.rows("SNAP")
