"""Rows holding runs of records (outbox/store.py): the same outbox, record for record, as one row per record.

Every observable of an outbox written in runs (and cut anywhere: relay batches, fenced drops,
replays at a seq inside a run) must equal that of an outbox written one record per row; an
outbox written by the version before runs migrates in place and keeps working.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bus.redis import RedisBus, checkpoint_key
from outbox import store
from outbox.relay import Relay
from outbox.store import Outbox, backlog_query, runs
from straw.outbox_check import check_outbox

OLD = Path(__file__).parent / "data" / "outbox_before_runs.sql"


def event(i: int) -> bytes:
    data = {"i": i, "s": "é\n" * (i % 3)}  # non-ASCII and newlines inside a run's events
    return orjson.dumps({"id": f"e{i}", "time": f"2026-11-30T00:00:{i % 60:02d}.000Z", "data": data})


def state(outbox: Outbox, streams: tuple[str, ...]) -> tuple[object, ...]:
    """Everything a reader of the outbox sees, record by record."""
    return (
        [tuple(r) for r in outbox.events()],
        outbox.backlog(),
        [(s.stream, s.published_seq, s.backlog, s.retained) for s in outbox.streams()],
        [outbox.oldest_pending_time(s, outbox.published_seq(s)) for s in streams],
        [(s.source, s.rows_read, s.rows_published) for s in outbox.sources()],
    )


Op = tuple[str, int, int]
OPS = st.lists(
    st.tuples(st.sampled_from(["append", "publish", "drop", "replay", "pending"]),
              st.integers(0, 40), st.integers(1, 30)),
    min_size=1, max_size=25,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS, row_records=st.integers(2, 9))
def test_runs_read_as_one_row_per_record_whatever_cuts_them(
    tmp_path_factory: pytest.TempPathFactory, ops: list[Op], row_records: int
) -> None:
    folder = tmp_path_factory.mktemp("runs")
    single, batched = Outbox(folder / "one.db", row_records=1), Outbox(folder / "runs.db", row_records=row_records)
    outboxes = (single, batched)
    try:
        for outbox in outboxes:
            outbox.adopt("s", 3, {})
        count = 0
        for op, a, b in ops:
            top = 3 + count
            if op == "append":
                for outbox in outboxes:
                    outbox.append("src", "s", [(f"p{count + i}", event(count + i)) for i in range(b)], [], f"p{b}", b)
                count += b
            elif op == "publish":  # the relay's path: what pending returned, marked up to any record of it
                after = single.published_seq("s")
                waiting = [outbox.pending("s", after, b) for outbox in outboxes]
                assert waiting[0] == waiting[1]
                if waiting[0]:
                    upto = waiting[0][a % len(waiting[0])].seq
                    assert single.mark_published("s", upto) == batched.mark_published("s", upto)
            elif op == "drop":  # a newer lease holder's checkpoint fences what is below it
                upto = min(top, 3 + a)
                assert single.drop_unpublished("s", upto) == batched.drop_unpublished("s", upto)
            elif op == "replay":  # `straw reread`: everything above the bus's checkpoint goes
                seq = max(single.published_seq("s") - a, 0) if a % 2 else min(top, single.published_seq("s") + a)
                assert single.replay("s", seq, {"src": "p0"})[0] == batched.replay("s", seq, {"src": "p0"})[0]
            else:
                after = 3 + a
                assert single.pending("s", after, b) == batched.pending("s", after, b)
            assert state(single, ("s",)) == state(batched, ("s",))
        if single.events():  # the later seqs continue after the runs, never inside them
            assert batched.events()[-1].seq == single.events()[-1].seq
    finally:
        for outbox in outboxes:
            outbox.close()


def test_a_run_cut_by_the_relay_batch_is_published_once_each_record_with_its_seq(
    tmp_path: Path, redis_url: str, stream_name: str
) -> None:
    client = redis.Redis.from_url(redis_url)
    outbox = Outbox(tmp_path / "outbox.db", row_records=10)
    try:
        outbox.adopt(stream_name, 0, {})
        sent = [(f"p{i}", event(i)) for i in range(25)]
        outbox.append("src", stream_name, sent, [], "p24", 25)
        assert outbox.db.execute("SELECT count(*) FROM records").fetchone()[0] == 3  # rows of 10, 10 and 5
        relay = Relay(RedisBus(client), outbox, batch_size=4)
        while relay.publish(stream_name).more:
            pass
        entries = client.xrange(stream_name)
        assert [(int(f[b"seq"]), f[b"pos"].decode(), f[b"event"]) for _id, f in entries] == [
            (i + 1, pos, ev) for i, (pos, ev) in enumerate(sent)
        ]
        assert outbox.backlog() == 0
        assert outbox.sources()[0].rows_published == 25
        assert outbox.retained(stream_name).records == 25
    finally:
        outbox.close()


@pytest.fixture
def old_outbox(tmp_path: Path, stream_name: str) -> Iterator[Path]:
    """The file straw wrote before runs (tests/data: a dump of one made by that version's own Outbox);
    its stream `s` renamed to this test's."""
    path = tmp_path / "outbox.db"
    with sqlite3.connect(path) as db:
        db.executescript(OLD.read_text())
        for table in ("records", "streams", "published_marks", "retention"):
            db.execute(f"UPDATE {table} SET stream = ? WHERE stream = 's'", (stream_name,))
    yield path


def test_an_outbox_from_before_runs_migrates_in_place_and_publishes_on(
    old_outbox: Path, redis_url: str, stream_name: str
) -> None:
    # Readers that never write (straw check, metrics) read it before any run migrates it.
    with sqlite3.connect(old_outbox) as db:
        assert not runs(db)
        assert db.execute(backlog_query(runs(db))).fetchone()[0] == 3  # seq 46, 47 of s; 48 of t (not adopted)
    assert check_outbox(old_outbox) == (True, check_outbox(old_outbox)[1])
    assert "backlog 3" in check_outbox(old_outbox)[1]

    outbox = Outbox(old_outbox, row_records=3)
    try:
        assert runs(outbox.db)
        assert outbox.backlog() == 3
        (state_s,) = [s for s in outbox.streams() if s.stream == stream_name]
        assert (state_s.published_seq, state_s.backlog) == (45, 2)
        assert (state_s.retained.records, state_s.retained.first, state_s.retained.last) == (5, 41, 45)
        assert outbox.oldest_pending_time(stream_name, 45) == "2026-11-29T10:00:06.000Z"
        old = outbox.events()
        assert [r.seq for r in old] == list(range(41, 49))
        assert [orjson.loads(r.event)["id"] for r in old] == [f"id-{i}" for i in (1, 2, 3, 4, 5, 6, 7, 9)]

        new = [(f'["{i}"]', event(i)) for i in range(10, 15)]
        outbox.append("orders", stream_name, new, [], '["14"]', 5)
        assert [r.seq for r in outbox.pending(stream_name, 45, 100)] == [46, 47, 49, 50, 51, 52, 53]
        assert outbox.dead_letter_counts() == {"orders": 1}

        # The bus holds what this outbox published (seq 45); the relay goes on from there.
        client = redis.Redis.from_url(redis_url)
        client.hset(checkpoint_key(stream_name), mapping={"seq": 45, "outbox": outbox.identity})
        relay = Relay(RedisBus(client), outbox, batch_size=2)
        while relay.publish(stream_name).more:
            pass
        entries = [fields for _id, fields in client.xrange(stream_name)]
        assert [int(f[b"seq"]) for f in entries] == [46, 47, 49, 50, 51, 52, 53]
        assert [f[b"event"] for f in entries] == [r.event for r in old[5:7]] + [ev for _pos, ev in new]
        assert outbox.published_seq(stream_name) == 53
        assert outbox.retained(stream_name).records == 12
        assert outbox.sources()[0].rows_published == 5 + 7
        # `straw reread` of the stream at a seq inside the new run: the run is cut there.
        dropped, _keyed = outbox.replay(stream_name, 51, {"orders": '["12"]'})
        assert dropped == 2 and [r.seq for r in outbox.events(stream_name)][-1] == 51
    finally:
        outbox.close()
    reopened = Outbox(old_outbox)  # a second start finds it migrated
    try:
        assert [r.seq for r in reopened.events(stream_name)] == [41, 42, 43, 44, 45, 46, 47, 49, 50, 51]
    finally:
        reopened.close()


def test_a_run_closes_at_its_bytes_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "ROW_BYTES", 1000)
    outbox = Outbox(tmp_path / "outbox.db", row_records=50)
    try:
        sent = [(str(i), b'"' + b"x" * (300 if i != 7 else 2000) + b'"') for i in range(20)]
        outbox.append("a", "s", sent, [], "19", 20)
        rows = outbox.db.execute("SELECT seq, n, length(event) FROM records ORDER BY seq").fetchall()
        assert all(size <= 1000 or n == 1 for _seq, n, size in rows) and len(rows) > 5
        assert [(r.seq, r.position, r.event) for r in outbox.events()] == [
            (i + 1, pos, ev) for i, (pos, ev) in enumerate(sent)]
    finally:
        outbox.close()


def test_a_new_outbox_assigns_seqs_after_runs_and_single_rows_alike(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.db", row_records=4)
    try:
        outbox.adopt("s", 100, {})
        outbox.append("a", "s", [(str(i), event(i)) for i in range(6)], [], "5", 6)
        assert outbox.resolve_dead_letter(1, "a", "s", ("x", event(99))) is None  # no such letter
        outbox.db.execute(
            "INSERT INTO dead_letters (source, position, reason, raw, created_at) VALUES ('a', 'x', 'r', '{}', 'now')"
        )
        assert outbox.resolve_dead_letter(1, "a", "s", ("x", event(99))) == 1  # at the source's position, "5"
        outbox.append("a", "s", [(str(i), event(i)) for i in range(6, 9)], [], "8", 3)
        assert [(r.seq, r.position) for r in outbox.events()] == [
            (101 + i, str(i)) for i in range(6)] + [(107, "5")] + [(108 + i, str(6 + i)) for i in range(3)]
        assert outbox.backlog() == 10
        assert str(uuid.UUID(outbox.identity))  # untouched by the migration
    finally:
        outbox.close()
