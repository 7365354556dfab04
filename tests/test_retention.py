"""Retention of published records, the relay's rollback repair in-process, durable acks, their configuration.

Fast: an outbox file and the shared Redis (each test its own stream). The
rollback here is made by hand on the bus (the stream cut back and its
checkpoint rewound, as a restart from an older snapshot leaves them); the
end-to-end cases with real restarts and failovers are in test_bus_rollback.py.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bus.redis import RedisBus, checkpoint_key
from bus.seam import BusDown, BusRefused, Checkpoint, Durability, Outgoing
from outbox.lock import OutboxLock
from outbox.relay import Relay, SplitBrain, run_relay
from outbox.store import Keep, Outbox
from straw.config_load import ConfigError, load_config
from tests.helpers import read_stream
from tests.test_cli import invoke, lines
from tests.test_config import BASE, write


def fill(outbox: Outbox, stream: str, count: int, source: str = "orders", size: int = 10) -> None:
    event = b'"' + b"x" * size + b'"'  # a JSON value, so the stream reads back as events do
    outbox.append(source, stream, [(str(i), event) for i in range(count)], [], str(count), count)


# --- retention ---------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(["a", "b"]),  # stream
            st.integers(0, 7),  # records appended
            st.integers(0, 9),  # records then published (at most what waits)
            st.integers(1, 300),  # event size
        ),
        min_size=1, max_size=12,
    ),
    records=st.integers(0, 20),
    size=st.integers(0, 2000),
    age=st.sampled_from([0.0, 1e9]),
    lag=st.integers(0, 10),  # how far the bus checkpoint is behind the published seq
)
def test_prune_never_takes_what_waits_or_what_the_bus_may_lack(
    tmp_path_factory: pytest.TempPathFactory,
    steps: list[tuple[str, int, int, int]],
    records: int,
    size: int,
    age: float,
    lag: int,
) -> None:
    outbox = Outbox(tmp_path_factory.mktemp("prune") / "outbox.db")
    try:
        for stream in ("a", "b"):
            outbox.adopt(stream, 0, {})
        for stream, appended, published, nbytes in steps:
            fill(outbox, stream, appended, size=nbytes)
            waiting = outbox.pending(stream, outbox.published_seq(stream), 1000)
            if published and waiting:
                outbox.mark_published(stream, waiting[min(published, len(waiting)) - 1].seq)
        before = {s: [r.seq for r in outbox.pending(s, 0, 10_000)] for s in ("a", "b")}
        holds = {s: max(0, outbox.published_seq(s) - lag) for s in ("a", "b")}

        while outbox.prune(Keep(age=age, records=records, size=size), holds, limit=3):
            pass  # a small limit: pruning in several calls ends where one call would

        for stream in ("a", "b"):
            published, pruned = outbox.published_seq(stream), outbox.pruned_seq(stream)
            after = [r.seq for r in outbox.pending(stream, 0, 10_000)]
            assert pruned <= holds[stream], "pruned above what the bus holds"
            assert after == [seq for seq in before[stream] if seq > pruned], "not one range above pruned_seq"
            kept = [seq for seq in after if seq <= published]
            if age and records >= len(before[stream]) and size >= 302 * len(before[stream]):
                assert pruned == 0, "pruned within every limit"
            assert outbox.retained(stream).records == len(kept)
    finally:
        outbox.close()


def test_retained_records_do_not_count_as_backlog_and_pending_skips_them(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.db")
    try:
        outbox.adopt("s", 0, {})
        fill(outbox, "s", 10)
        fill(outbox, "t", 2)  # a stream not adopted yet counts whole
        outbox.mark_published("s", 8)
        assert outbox.backlog() == 4
        assert [r.seq for r in outbox.pending("s", outbox.published_seq("s"), 100)] == [9, 10]
        (state,) = outbox.streams()
        assert (state.backlog, state.retained.records, state.retained.first, state.retained.last) == (2, 8, 1, 8)
        plan = " ".join(str(row) for row in outbox.db.execute(
            "EXPLAIN QUERY PLAN SELECT seq, n, source, position, sizes, event FROM records "
            "WHERE seq > ? AND stream = ? ORDER BY seq LIMIT ?", (8, "s", 10)))
        assert "records_stream_seq_n (stream=? AND seq>?)" in plan  # retained rows are never scanned
    finally:
        outbox.close()


# --- the relay's repair, in-process ------------------------------------------------------------------


def roll_back(client: redis.Redis, stream: str, to: int) -> None:
    """What a restart from an older snapshot leaves: the stream's first entries and a checkpoint at `to`."""
    entries = cast(list[tuple[bytes, dict[Any, Any]]], client.xrange(stream))
    kept = [fields for _id, fields in entries][:to]
    client.delete(stream)
    for fields in kept:
        client.xadd(stream, fields)
    client.hset(checkpoint_key(stream), "seq", to)


def relay_all(redis_url: str, outbox: Outbox, stream: str) -> Relay:
    """A new relay (as after a restart) that publishes until nothing is left."""
    relay = Relay(RedisBus(redis.Redis.from_url(redis_url)), outbox, batch_size=7)
    while relay.publish(stream).more:
        pass
    return relay


@contextmanager
def published(directory: Path, redis_url: str, stream: str, count: int) -> Iterator[Outbox]:
    """An outbox that has published `count` records to `stream`."""
    outbox = Outbox(directory / "outbox.db")
    try:
        outbox.adopt(stream, 0, {})
        fill(outbox, stream, count)
        relay_all(redis_url, outbox, stream)
        assert outbox.published_seq(stream) == count
        yield outbox
    finally:
        outbox.close()


def test_the_relay_repairs_a_rollback_and_never_prunes_what_it_must_resend(
    tmp_path: Path, redis_client: redis.Redis, redis_url: str, stream_name: str
) -> None:
    with published(tmp_path, redis_url, stream_name, 30) as outbox:
        roll_back(redis_client, stream_name, 10)
        fill(outbox, stream_name, 5)

        # Retention `age: 0` prunes all it may: only what the bus holds (<= 10) may go, mid-repair too.
        run_relay(lambda: RedisBus(redis.Redis.from_url(redis_url)), outbox, [stream_name], stop=threading.Event(),
                  batch_size=7, drained=lambda: True, keep=Keep(age=0), prune_interval=0)

        entries = read_stream(redis_client, stream_name)
        assert [e["seq"] for e in entries] == list(range(1, 36))
        rollback = outbox.rollback(stream_name)
        assert rollback is not None and rollback.repaired_at is not None
        assert rollback.describe().startswith("bus checkpoint seq 10 below published seq 30: re-published seq 11..30")
        assert outbox.pruned_seq(stream_name) == 35  # once the bus holds all again, all of it may go
        assert outbox.sources()[0].rows_published == 35  # the re-published records are not counted twice


def test_a_repair_cut_short_resumes_as_the_same_rollback(
    tmp_path: Path, redis_client: redis.Redis, redis_url: str, stream_name: str
) -> None:
    """The repair's progress is the bus checkpoint itself: a relay that dies mid-repair leaves nothing to undo."""
    with published(tmp_path, redis_url, stream_name, 30) as outbox:
        roll_back(redis_client, stream_name, 10)
        Relay(RedisBus(redis.Redis.from_url(redis_url)), outbox, batch_size=7).publish(stream_name)  # then "dies"
        assert redis_client.xlen(stream_name) == 17
        second = relay_all(redis_url, outbox, stream_name)
        assert [e["seq"] for e in read_stream(redis_client, stream_name)] == list(range(1, 31))
        assert outbox.db.execute("SELECT count(*) FROM rollbacks").fetchone()[0] == 1
        rollback = outbox.rollback(stream_name)
        assert rollback is not None and rollback.repaired_at is not None and not second.repairing


def test_a_rollback_under_another_outbox_is_split_brain(
    tmp_path: Path, redis_client: redis.Redis, redis_url: str, stream_name: str
) -> None:
    with published(tmp_path, redis_url, stream_name, 5) as outbox:
        redis_client.hset(checkpoint_key(stream_name), mapping={"seq": 2, "outbox": "someone-else"})
        with pytest.raises(SplitBrain, match="was written by outbox someone-else: the bus lost records"):
            Relay(RedisBus(redis.Redis.from_url(redis_url)), outbox).publish(stream_name)


# --- durable acks --------------------------------------------------------------------------------------


def test_replicated_without_replicas_never_counts_a_publish(redis_url: str, stream_name: str) -> None:
    """The shared Redis has no replica: WAIT answers 0, so the publish is retried, never taken as done."""
    bus = RedisBus(redis.Redis.from_url(redis_url), durability=Durability("replicated", 1, 0.2))
    try:
        with pytest.raises(BusDown, match=r"bus.durability replicated: 0 of 1 replicas confirmed the publish "
                                          r"after 0.2s; retrying \(the records stay in the outbox\)"):
            bus.publish(stream_name, Checkpoint(), [Outgoing(1, "s", "1", b"{}")], "me")
        # A new connection cannot settle it by reading the checkpoint either.
        with pytest.raises(BusDown, match="0 of 1 replicas hold the stream's checkpoint"):
            bus.checkpoint(stream_name)
        assert RedisBus(redis.Redis.from_url(redis_url), durability=Durability("replicated", 0, 0.2)).checkpoint(
            stream_name).seq == 1  # `replicas: 0` asks for none
    finally:
        bus.close()


def test_fsync_on_a_server_without_waitaof_is_one_final_line(redis_url: str, stream_name: str) -> None:
    bus = RedisBus(redis.Redis.from_url(redis_url), durability=Durability("fsync", 0, 0.2))
    version = str(bus.client.info("server")["redis_version"])
    try:
        if tuple(map(int, version.split(".")[:2])) >= (7, 2) and bus.client.config_get("appendonly") == {
                "appendonly": "yes"}:
            pytest.skip(f"Redis {version} with appendonly: WAITAOF works here")
        with pytest.raises(BusRefused) as refused:
            bus.publish(stream_name, Checkpoint(), [Outgoing(1, "s", "1", b"{}")], "me")
        assert "\n" not in str(refused.value)
        assert str(refused.value).startswith("bus.durability fsync needs WAITAOF (Redis 7.2 or newer, with appendonly")
        assert "use `durability: replicated`" in str(refused.value)
    finally:
        bus.close()


# --- configuration and the replay command ---------------------------------------------------------------


def test_retain_and_durability_are_configured_and_checked(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, BASE.replace("  path: var/outbox.db\n", "  path: x.db\n  retain: 2h\n")))
    assert (config.outbox.retain.age, config.outbox.retain.records) == (7200.0, 1_000_000)
    bad = [
        ("  path: var/outbox.db\n", "  path: x.db\n  retain: soon\n", "outbox.retain", "not a duration: 'soon'"),
        ("  path: var/outbox.db\n", "  path: x.db\n  retain: {records: -1}\n", "outbox.retain.records",
         "greater than or equal to 0"),
        ("redis:\n  url: redis://127.0.0.1:6379/0\n", "bus:\n  url: redis://127.0.0.1:6379/0\n  durability: always\n",
         "bus.durability", "'ack', 'replicated' or 'fsync'"),
    ]
    for old, new, key, hint in bad:
        path = write(tmp_path, BASE.replace(old, new))
        with pytest.raises(ConfigError) as caught:
            load_config(path)
        [problem] = caught.value.problems
        assert problem.key == key and hint in problem.message, str(problem)
        assert "\n" not in str(problem)


def test_reread_refuses_while_straw_runs_and_on_an_unknown_stream(
    tmp_path: Path, redis_url: str, stream_name: str
) -> None:
    text = BASE.replace("redis://127.0.0.1:6379/0", redis_url).replace("var/outbox.db", str(tmp_path / "o.db"))
    path = write(tmp_path, text.replace("erp.orders", stream_name))
    with OutboxLock(tmp_path / "o.db"):
        ran = invoke("reread", stream_name, "--config", str(path))
    assert ran.exit_code == 1
    [line] = lines(ran.stderr)
    assert "is in use by another straw process" in line and line.endswith("(stop straw before a reread)")
    ran = invoke("reread", "nope", "--config", str(path))
    assert ran.exit_code == 1
    assert lines(ran.stderr) == [f"error no source publishes to stream 'nope'; the configured streams: {stream_name}"]
    ran = invoke("reread", stream_name, "--config", str(path))
    assert ran.exit_code == 0, ran.output
    assert "nothing to read again" in ran.stdout
