"""The consumer SDK on real Redis: groups, ack after the handler, reclaim, delivery counts, dead letters."""

from __future__ import annotations

import datetime as dt
import threading
import time
from decimal import Decimal
from typing import Literal

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fixtures.legacy_orders import ORDER_ENTITY
from loaders.records import Record
from loaders.redis_consumer import RedisConsumer
from loaders.sdk import Settings, consume, each
from straw.config import EntitySpec
from tests.loader_helpers import order_data, xadd_events

ENTITIES = {"order": EntitySpec.model_validate(ORDER_ENTITY)}


def member(client: redis.Redis, stream: str, name: str = "m1", claim_idle: float = 0.1, start: str = "begin",
           group: str = "g") -> RedisConsumer:
    return RedisConsumer(client, [stream], group, name, claim_idle=claim_idle,
                         dead_letters=lambda s: f"{s}.dlq", start=start)


def test_records_arrive_typed_and_are_acked_after_the_handler(redis_client: redis.Redis, stream_name: str) -> None:
    xadd_events(redis_client, stream_name, [("upserted", order_data(n, amount=f"{n}.10")) for n in range(1, 6)])
    seen: list[Record] = []
    tally = consume(member(redis_client, stream_name), each(seen.append), ENTITIES, Settings(batch_size=2), once=True)
    assert [r.seq for r in seen] == [1, 2, 3, 4, 5]
    first = seen[0]
    assert first.data["amount"] == Decimal("1.10") and isinstance(first.data["amount"], Decimal)
    assert first.data["changed_at"] == dt.datetime(2026, 11, 1, 8, 30, tzinfo=dt.UTC)
    assert first.data["changed_at"].tzinfo is not None
    assert first.data["order_date"] == dt.date(2026, 11, 1)
    assert first.entity == "order" and first.op == "upserted" and first.subject == "1" and first.position == "[1]"
    assert first.stream == stream_name and first.entry_id and len(first.id) == 32
    assert tally.applied == 5 and tally.batches == 3
    assert redis_client.xpending(stream_name, "g")["pending"] == 0


def test_a_failing_handler_leaves_the_entry_pending(redis_client: redis.Redis, stream_name: str) -> None:
    xadd_events(redis_client, stream_name, [("upserted", order_data(1))])
    consumer = member(redis_client, stream_name, claim_idle=60)
    stop = threading.Event()

    def boom(record: Record) -> None:
        stop.set()
        raise RuntimeError("target says no")

    consume(consumer, each(boom), ENTITIES, Settings(block=0.1), stop=stop)
    assert redis_client.xpending(stream_name, "g")["pending"] == 1
    assert redis_client.xlen(f"{stream_name}.dlq") == 0


def test_a_poison_record_is_dead_lettered_after_max_deliveries_and_the_rest_applied(
    redis_client: redis.Redis, stream_name: str
) -> None:
    xadd_events(redis_client, stream_name, [("upserted", order_data(n)) for n in range(1, 11)])
    attempts: list[int] = []
    applied: list[int] = []

    def handle(record: Record) -> None:
        if record.data["order_no"] == 4:
            attempts.append(record.deliveries)
            raise ValueError("numeric field overflow")
        applied.append(record.seq)

    tally = consume(member(redis_client, stream_name), each(handle), ENTITIES,
                    Settings(batch_size=3, max_deliveries=3, claim_idle=0.1), once=True)
    assert applied == [1, 2, 3, 5, 6, 7, 8, 9, 10]  # the records behind the poison went on
    assert attempts == [1, 2, 3]
    assert tally.dead_letters == 1
    [(_, fields)] = redis_client.xrange(f"{stream_name}.dlq")
    assert fields[b"error"] == b"ValueError: numeric field overflow"
    assert fields[b"deliveries"] == b"3" and fields[b"consumer"] == b"m1" and fields[b"group"] == b"g"
    assert fields[b"seq"] == b"4" and fields[b"stream"] == stream_name.encode()
    assert redis_client.xpending(stream_name, "g")["pending"] == 0


def test_entries_of_a_dead_member_are_reclaimed_with_their_delivery_count(
    redis_client: redis.Redis, stream_name: str
) -> None:
    xadd_events(redis_client, stream_name, [("upserted", order_data(n)) for n in range(1, 4)])
    dead = member(redis_client, stream_name, name="dead")
    assert len(dead.read(10, 0)) == 3  # read, never acked: the member "died"
    seen: list[Record] = []
    consume(member(redis_client, stream_name, name="heir", claim_idle=0.05), each(seen.append), ENTITIES,
            Settings(claim_idle=0.05), once=True)
    assert [r.seq for r in seen] == [1, 2, 3]
    assert all(r.deliveries == 2 for r in seen)
    assert redis_client.xpending(stream_name, "g")["pending"] == 0


def test_a_restarted_member_takes_its_own_pending_entries_first(redis_client: redis.Redis, stream_name: str) -> None:
    xadd_events(redis_client, stream_name, [("upserted", order_data(n)) for n in range(1, 3)])
    assert len(member(redis_client, stream_name, name="same", claim_idle=60).read(10, 0)) == 2
    seen: list[Record] = []
    consume(member(redis_client, stream_name, name="same", claim_idle=60), each(seen.append), ENTITIES,
            Settings(claim_idle=60), once=True)
    assert [r.seq for r in seen] == [1, 2]


def test_a_group_started_at_the_end_sees_only_new_entries(redis_client: redis.Redis, stream_name: str) -> None:
    xadd_events(redis_client, stream_name, [("upserted", order_data(1))])
    consumer = member(redis_client, stream_name, start="end")
    xadd_events(redis_client, stream_name, [("upserted", order_data(2))], first_seq=2)
    seen: list[Record] = []
    consume(consumer, each(seen.append), ENTITIES, Settings(), once=True)
    assert [r.seq for r in seen] == [2]


def test_a_record_that_kills_its_consumer_every_time_is_dead_lettered_unapplied(
    redis_client: redis.Redis, stream_name: str
) -> None:
    xadd_events(redis_client, stream_name, [("upserted", order_data(1))])
    for n in range(3):  # three members read it and die
        assert len(member(redis_client, stream_name, name=f"dies{n}", claim_idle=0.01).read(10, 0)) == 1
        threading.Event().wait(0.03)
    seen: list[Record] = []
    tally = consume(member(redis_client, stream_name, name="last", claim_idle=0.01), each(seen.append), ENTITIES,
                    Settings(max_deliveries=3, claim_idle=0.01), once=True)
    assert seen == [] and tally.dead_letters == 1
    [(_, fields)] = redis_client.xrange(f"{stream_name}.dlq")
    assert b"never acked" in fields[b"error"] and fields[b"deliveries"] == b"4"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fields=st.dictionaries(st.sampled_from(["seq", "pos", "event", "x"]),
                              st.one_of(st.text(max_size=30), st.binary(max_size=30),
                                        st.sampled_from(['{"type": "order.upserted", "data": {"amount": "x"}}',
                                                         '{"type": "order.upserted", "data": []}',
                                                         '{"type": "nope.upserted", "data": {}}', "[]"])),
                              min_size=1))
def test_hostile_entries_become_dead_letters_never_exceptions(
    redis_client: redis.Redis, stream_name: str, fields: dict[str, str | bytes]
) -> None:
    redis_client.delete(stream_name, f"{stream_name}.dlq")
    redis_client.xadd(stream_name, fields)  # type: ignore[arg-type]
    xadd_events(redis_client, stream_name, [("upserted", order_data(1))], first_seq=7)
    seen: list[Record] = []
    consumer = member(redis_client, stream_name, name="h", claim_idle=0.01)
    tally = consume(consumer, each(seen.append), ENTITIES, Settings(max_deliveries=1), once=True)
    assert seen[-1].seq == 7  # the good record behind it was applied
    assert tally.applied + tally.dead_letters == 2
    assert redis_client.xpending(stream_name, "g")["pending"] == 0


@pytest.mark.parametrize("bad", ["not json", '{"type": "order.upserted"}'])
def test_dead_letter_entry_keeps_the_raw_event(redis_client: redis.Redis, stream_name: str, bad: str) -> None:
    redis_client.xadd(stream_name, {"seq": "1", "pos": "[1]", "event": bad})
    consume(member(redis_client, stream_name), each(lambda r: None), ENTITIES, Settings(max_deliveries=1), once=True)
    [(_, fields)] = redis_client.xrange(f"{stream_name}.dlq")
    assert fields[b"event"] == bad.encode() and fields[b"error"]


def test_the_applied_helper_skips_what_the_target_has(
    redis_client: redis.Redis, stream_name: str, tmp_path: pytest.TempPathFactory
) -> None:
    """A hand-written loader with `loaders.applied`: a redelivery after a crash before the ack is skipped."""
    from sqlalchemy import create_engine, text

    from loaders import applied

    engine = create_engine(f"sqlite:///{tmp_path}/target.db")
    with engine.begin() as conn:
        applied.create(conn)
        conn.execute(text("CREATE TABLE seen (seq INTEGER)"))

    def apply(records: list[Record]) -> list[object]:
        with engine.begin() as conn:
            todo = applied.fresh(conn, records)
            for record in todo:
                conn.execute(text("INSERT INTO seen VALUES (:s)"), {"s": record.seq})
            applied.mark(conn, records)
        return []

    xadd_events(redis_client, stream_name, [("upserted", order_data(n)) for n in range(1, 5)])
    consume(member(redis_client, stream_name), apply, ENTITIES, Settings(), once=True)  # type: ignore[arg-type]
    redis_client.xgroup_setid(stream_name, "g", "0")  # everything is delivered again
    consume(member(redis_client, stream_name, "m2"), apply, ENTITIES, Settings(), once=True)  # type: ignore[arg-type]
    with engine.connect() as conn:
        assert [s for (s,) in conn.execute(text("SELECT seq FROM seen ORDER BY seq"))] == [1, 2, 3, 4]
    engine.dispose()


def test_the_readme_sdk_example_runs(
    tmp_path: pytest.TempPathFactory, redis_url: str, redis_client: redis.Redis, stream_name: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The README's SDK example, as written, against this test's stream and config."""
    import re
    from pathlib import Path

    from tests.crashes import REPO
    from tests.loader_helpers import loader_config

    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### The SDK: a loader of your own"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]
    config = loader_config(Path(str(tmp_path)), redis_url, [], stream_name)
    code = code.replace('"straw.yaml"', repr(str(config))).replace('"erp.orders"', repr(stream_name))
    xadd_events(redis_client, stream_name, [("upserted", order_data(7, amount="1234.50"))])
    exec(compile(code, "README.md", "exec"), {})
    assert "1 upserted 7 {'order_no': 7, 'customer': 'Café Ørsted', 'amount': Decimal('1234.50')" in \
        capsys.readouterr().out


def test_with_a_backlog_the_next_batch_is_read_while_this_one_is_applied_and_order_holds(
    redis_client: redis.Redis, stream_name: str
) -> None:
    xadd_events(redis_client, stream_name, [("upserted", order_data(n)) for n in range(1, 10)])
    seen: list[int] = []
    pending_while_first: list[int] = []

    def handle(record: Record) -> None:
        if record.seq == 1:  # the second batch (4..6) is delivered to this member before the first is applied
            deadline = time.monotonic() + 5
            while redis_client.xpending(stream_name, "g")["pending"] < 6 and time.monotonic() < deadline:
                time.sleep(0.005)
            pending_while_first.append(redis_client.xpending(stream_name, "g")["pending"])
        seen.append(record.seq)

    tally = consume(member(redis_client, stream_name, claim_idle=60), each(handle), ENTITIES,
                    Settings(batch_size=3, claim_idle=60), once=True)
    assert pending_while_first == [6]
    assert seen == list(range(1, 10))  # batches applied one after the other, in stream order
    assert tally.applied == 9 and tally.batches == 3
    assert redis_client.xpending(stream_name, "g")["pending"] == 0


@pytest.mark.parametrize("read_ahead", ["thread", "pipelined"])
def test_a_stop_applies_and_acks_the_batch_read_ahead_too(
    redis_client: redis.Redis, stream_name: str, read_ahead: Literal["thread", "pipelined"]
) -> None:
    """SIGTERM finishes what is in hand: the batch applied and the one read ahead for it; nothing stays pending."""
    xadd_events(redis_client, stream_name, [("upserted", order_data(n)) for n in range(1, 10)])
    stop = threading.Event()
    seen: list[int] = []

    def handle(record: Record) -> None:
        stop.set()
        seen.append(record.seq)

    tally = consume(member(redis_client, stream_name, claim_idle=60), each(handle), ENTITIES,
                    Settings(batch_size=3, claim_idle=60, block=0.1, read_ahead=read_ahead), stop=stop)
    assert tally.stopped and seen == [1, 2, 3, 4, 5, 6] and tally.applied == 6
    assert redis_client.xpending(stream_name, "g")["pending"] == 0
    assert len(member(redis_client, stream_name, claim_idle=60).read(10, 0)) == 3  # 7..9 were never read


@pytest.mark.parametrize("read_ahead", ["thread", "pipelined"])
@pytest.mark.parametrize("protocol", [2, 3])
def test_the_consumer_reads_replies_of_both_protocols(
    redis_url: str, stream_name: str, protocol: int, read_ahead: Literal["thread", "pipelined"]
) -> None:
    client = redis.Redis.from_url(redis_url, protocol=protocol)
    try:
        xadd_events(client, stream_name, [("upserted", order_data(n)) for n in range(1, 4)])
        client.xadd(stream_name, {"seq": "4", "pos": "[4]", "event": "[]", "extra": "x"})  # not the relay's layout
        xadd_events(client, stream_name, [("upserted", order_data(n)) for n in range(5, 8)], first_seq=5)
        seen: list[Record] = []
        tally = consume(member(client, stream_name), each(seen.append), ENTITIES,
                        Settings(batch_size=2, max_deliveries=1, read_ahead=read_ahead), once=True)
        assert [r.seq for r in seen] == [1, 2, 3, 5, 6, 7] and seen[0].position == "[1]" and tally.dead_letters == 1
        assert client.xpending(stream_name, "g")["pending"] == 0
        [(_, fields)] = client.xrange(f"{stream_name}.dlq")
        assert fields[b"extra"] == b"x" and fields[b"event"] == b"[]"
    finally:
        client.close()


def test_integers_past_64_bits_reach_the_handler_whole_and_a_float_is_no_integer(
    redis_client: redis.Redis, stream_name: str
) -> None:
    """orjson reads 18446744073709551621 as the float 1.8446744073709552e+19: the record is parsed again
    exactly. An integer field that holds a float (1e20, 2.5) is a dead letter, never truncated."""
    big = 2**64 + 5
    xadd_events(redis_client, stream_name, [("upserted", order_data(big)), ("upserted", order_data(-big))])
    for seq, number in ((3, "1e20"), (4, "2.5")):
        event = ('{"specversion":"1.0","id":"x","source":"s","type":"order.upserted","subject":"1",'
                 f'"data":{{"order_no":{number},"amount":"1.00"}}}}')
        redis_client.xadd(stream_name, {"seq": str(seq), "pos": f"[{seq}]", "event": event})
    seen: list[Record] = []
    tally = consume(member(redis_client, stream_name), each(seen.append), ENTITIES, Settings(max_deliveries=1),
                    once=True)
    assert [r.data["order_no"] for r in seen] == [big, -big]
    assert all(type(r.data["order_no"]) is int for r in seen)
    assert tally.dead_letters == 2
    errors = [f[b"error"].decode() for _, f in redis_client.xrange(f"{stream_name}.dlq")]
    assert "not an integer" in errors[0] and "2.5 has a fraction" in errors[1], errors
