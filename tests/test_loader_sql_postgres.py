"""The SQL loader's one-statement batch on PostgreSQL (loaders/sql_postgres.py), attacked directly.

Records are built as the SDK builds them (`parse` of a stream entry) and handed to `SqlLoader.apply`, so each
test sees exactly which records a batch applied and which it failed; the last one goes through Redis to show
a value the column cannot hold ends as a dead letter after `max_deliveries`, with the batch around it applied.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
import redis
from sqlalchemy import create_engine, text

from loaders.records import Delivery, Record, parse
from loaders.redis_consumer import RedisConsumer
from loaders.sdk import Settings, consume
from loaders.sql import SqlLoader, key_hash
from straw.config import EntitySpec
from straw.config_loaders import SqlLoaderSpec
from straw.records import encode_event, source_uri

ENTITY = EntitySpec.model_validate({
    "key": ["code"],
    "fields": {"code": "string", "n": "integer", "amount": {"type": "decimal", "scale": 2}, "at": "datetime",
               "attrs": "json", "blob": "bytes", "note": "string"},
})
ENTITIES = {"item": ENTITY}
STREAM = "test.pg.items"


def entry(seq: int, op: str, data: dict[str, Any], stream: str = STREAM) -> dict[str, str]:
    event = encode_event(source=source_uri("test", "items"), entity="item", op=op, key=str(data["code"]),
                         position=f"[{seq}]", time="2026-11-29T10:00:00Z", data=data)
    return {"seq": str(seq), "pos": f"[{seq}]", "event": event if isinstance(event, str) else event.decode()}


def item(code: str, **values: Any) -> dict[str, Any]:
    return {"code": code, "n": 1, "amount": "1.00", "at": "2026-11-01T09:30:00+01:00", "attrs": None,
            "blob": base64.b64encode(b"\x00\xff").decode(), "note": None, **values}


def records(*changes: tuple[str, dict[str, Any]], first: int = 1) -> list[Record]:
    return [parse(Delivery(STREAM, f"{seq}-0", entry(seq, op, data), 1), ENTITIES)
            for seq, (op, data) in enumerate(changes, first)]


@pytest.fixture
def loader(pg_url: str) -> Iterator[SqlLoader]:
    target = SqlLoader(SqlLoaderSpec(name="t", kind="sql", url=pg_url, streams=[STREAM], create_tables=True,
                                     tables={"item": "items"}), ENTITIES)
    yield target
    target.close()


def table(url: str, query: str = "SELECT * FROM items ORDER BY code") -> list[dict[str, Any]]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [dict(r) for r in conn.execute(text(query)).mappings()]
    finally:
        engine.dispose()


def test_one_batch_with_upserts_and_deletes_of_one_key_applies_them_in_stream_order(
    loader: SqlLoader, pg_url: str
) -> None:
    batch = records(
        ("upserted", item("a", note="first")), ("deleted", {"code": "a"}),  # ends deleted
        ("deleted", {"code": "b"}), ("upserted", item("b", note="back")),  # a delete of a missing row, then back
        ("upserted", item("c", n=1)), ("upserted", item("c", n=2)),  # the last upsert wins
        ("upserted", item("d")), ("deleted", {"code": "d"}), ("upserted", item("d", note="again")),
    )
    assert loader.apply(batch) == []
    got = {r["code"]: r for r in table(pg_url)}
    assert sorted(got) == ["b", "c", "d"]
    assert got["b"]["note"] == "back" and got["c"]["n"] == 2 and got["d"]["note"] == "again"
    versions = {r["key_hash"]: (r["seq"], r["deleted"]) for r in table(pg_url, "SELECT * FROM straw_versions")}
    assert versions == {key_hash("a"): (2, True), key_hash("b"): (4, False), key_hash("c"): (6, False),
                        key_hash("d"): (9, False)}
    assert table(pg_url, "SELECT seq FROM straw_applied") == [{"seq": 9}]
    # Delivered again (a crash before the ack): nothing moves, not even a row an operator edited since.
    with create_engine(pg_url).begin() as conn:
        conn.execute(text("UPDATE items SET note = 'edited' WHERE code = 'c'"))
    assert loader.apply(batch) == []
    assert {r["code"]: r["note"] for r in table(pg_url)}["c"] == "edited"
    # An older change of a key arriving after a newer one (another member's slow batch) is skipped.
    assert loader.apply(records(("upserted", item("a", note="stale")), first=1)) == []
    assert "a" not in {r["code"] for r in table(pg_url)}


def test_values_land_exact_decimals_at_the_declared_scale(loader: SqlLoader, pg_url: str) -> None:
    big = "12345678901234567890123456789012345.67"  # 37 digits: NUMERIC(38, 2) holds it exactly
    batch = records(
        ("upserted", item("exact", amount=big, attrs="just a string", note="Zoë ✓ \\ \" '")),
        ("upserted", item("round", amount="1.005", attrs={"a": [1, 2.5, None]})),  # to the scale, as NUMERIC does
        ("upserted", item("neg", amount="-0.1", n=-(2**63), at="2026-11-01T23:59:59.999999-12:00")),
    )
    assert loader.apply(batch) == []
    got = {r["code"]: r for r in table(pg_url)}
    assert got["exact"]["amount"] == Decimal(big) and got["exact"]["note"] == "Zoë ✓ \\ \" '"
    assert got["exact"]["attrs"] == "just a string"  # a JSON string stays a string
    assert got["round"]["amount"] == Decimal("1.01") and got["round"]["attrs"] == {"a": [1, 2.5, None]}
    assert str(got["neg"]["amount"]) == "-0.10" and got["neg"]["n"] == -(2**63)
    assert got["neg"]["at"].isoformat() == "2026-11-02T11:59:59.999999+00:00"
    assert bytes(got["neg"]["blob"]) == b"\x00\xff"


def test_a_value_the_column_cannot_hold_fails_its_record_alone_never_truncated(
    loader: SqlLoader, pg_url: str
) -> None:
    batch = records(
        ("upserted", item("ok1")),
        ("upserted", item("overflow", amount="1" + "0" * 36)),  # 37 integer digits: NUMERIC(38, 2) overflows
        ("upserted", item("big", n=2**63)),  # past BIGINT
        ("upserted", item("huge", n=2**64 + 1)),  # past 64 bits: not even JSON for the batch
        ("upserted", item("k" * 256)),  # the key column is VARCHAR(255): refused, not cut to 255
        ("upserted", item("ok2")),
    )
    failed = loader.apply(batch)
    assert [f.record.seq for f in failed] == [2, 3, 4, 5]
    assert "overflow" in failed[0].error and "out of range" in failed[1].error
    assert "too long" in failed[3].error
    assert [r["code"] for r in table(pg_url)] == ["ok1", "ok2"]
    assert table(pg_url, "SELECT seq FROM straw_applied") == [{"seq": 6}]


def test_an_overflowing_value_ends_a_dead_letter_after_max_deliveries_and_the_rest_is_applied(
    loader: SqlLoader, pg_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    for seq, data in enumerate([item("a"), item("bad", amount="9" * 40), item("c")], 1):
        redis_client.xadd(stream_name, entry(seq, "upserted", data, stream_name))  # type: ignore[arg-type]
    consumer = RedisConsumer(redis_client, [stream_name], "t", "c1", claim_idle=0.05,
                             dead_letters=lambda s: f"{s}.dlq")
    try:
        tally = consume(consumer, loader.apply, ENTITIES, Settings(max_deliveries=2, claim_idle=0.05), once=True,
                        stop=threading.Event())
    finally:
        consumer.close()
    assert (tally.applied, tally.failed, tally.dead_letters) == (2, 2, 1)
    [(_, dead)] = redis_client.xrange(f"{stream_name}.dlq")
    assert dead[b"seq"] == b"2" and dead[b"deliveries"] == b"2" and b"overflow" in dead[b"error"]
    assert [r["code"] for r in table(pg_url)] == ["a", "c"]
    assert redis_client.xpending(stream_name, "t")["pending"] == 0


def test_a_first_batch_that_rolls_back_does_not_lose_the_streams_applied_row(db_url: str) -> None:
    """The row in `straw_applied` is created in the batch's transaction: a loader must not believe it exists
    after that transaction rolled back (every later batch then moved nothing). On each dialect."""
    target = SqlLoader(SqlLoaderSpec(name="t", kind="sql", url=db_url, streams=[STREAM], create_tables=True,
                                     tables={"item": "items"}), ENTITIES)
    try:
        [failed] = target.apply(records(("upserted", {**item("x"), "code": None})))
        assert failed.record.seq == 1
        assert target.apply(records(("upserted", item("y")), first=2)) == []
    finally:
        target.close()
    assert table(db_url, "SELECT stream, seq FROM straw_applied") == [{"stream": STREAM, "seq": 2}]
    assert [r["code"] for r in table(db_url)] == ["y"]


def test_a_batch_of_two_streams_and_two_entities_one_with_a_composite_key(pg_url: str) -> None:
    line = EntitySpec.model_validate({"key": ["order_no", "line_no"],
                                      "fields": {"order_no": "integer", "line_no": "integer", "qty": "integer"}})
    entities = {"item": ENTITY, "line": line}
    other = "test.pg.lines"

    def line_entry(seq: int, op: str, data: dict[str, Any]) -> Record:
        event = encode_event(source=source_uri("test", "lines"), entity="line", op=op,
                             key=f"{data['order_no']}/{data['line_no']}", position=f"[{seq}]",
                             time="2026-11-29T10:00:00Z", data=data)
        fields = {"seq": str(seq), "pos": f"[{seq}]", "event": event if isinstance(event, str) else event.decode()}
        return parse(Delivery(other, f"{seq}-0", fields, 1), entities)

    target = SqlLoader(SqlLoaderSpec(name="t", kind="sql", url=pg_url, streams=[STREAM, other], create_tables=True,
                                     tables={"item": "items", "line": "lines"}), entities)
    try:
        batch = [
            *records(("upserted", item("a")), ("upserted", item("b"))),
            line_entry(1, "upserted", {"order_no": 1, "line_no": 1, "qty": 5}),
            line_entry(2, "upserted", {"order_no": 1, "line_no": 2, "qty": 6}),
            line_entry(3, "deleted", {"order_no": 1, "line_no": 1}),  # only (1, 1): not every line of order 1
            *records(("deleted", {"code": "a"}), first=3),
        ]
        assert target.apply(batch) == []
    finally:
        target.close()
    assert [r["code"] for r in table(pg_url)] == ["b"]
    assert table(pg_url, "SELECT * FROM lines") == [{"order_no": 1, "line_no": 2, "qty": 6}]
    assert table(pg_url, "SELECT stream, seq FROM straw_applied ORDER BY stream") == [
        {"stream": STREAM, "seq": 3}, {"stream": other, "seq": 3}]
