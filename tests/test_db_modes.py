"""Change detection on real databases: incrementing and timestamp modes, streaming, bound watermarks."""

from __future__ import annotations

import datetime as dt
from itertools import pairwise
from pathlib import Path
from typing import Any

import orjson
import redis
import yaml
from sqlalchemy import Column, MetaData, String, Table, create_engine, insert, select, update
from sqlalchemy.engine import Engine

from adapters.db import position
from adapters.db.poller import DbSource
from bus.redis import RedisBus
from fixtures.legacy_orders import START, create_orders, order_rows
from outbox.relay import adopt_streams
from outbox.store import Outbox
from straw.config import ChangeMode, DbSourceSpec
from straw.config_load import load_config
from straw.runner import build_pipeline, poll
from tests.helpers import ORDER_MAPPING, orders_config, read_stream, run_once


def subjects(client: redis.Redis, stream: str) -> list[str]:
    return [e["event"]["subject"] for e in read_stream(client, stream)]


def add_orders(engine: Engine, table: Table, rows: list[dict[str, Any]]) -> None:
    with engine.begin() as conn:
        conn.execute(insert(table), rows)


def db_source(db_url: str, mode: str, batch_size: int = 1000) -> DbSource:
    change = (
        {"incrementing_column": "ORDER_NO"}
        if mode == "incrementing"
        else {"timestamp_column": "CHANGED_AT", "key_column": "ORDER_NO"}
    )
    spec = DbSourceSpec(
        name="orders", url=db_url, table="ORDERS", mode=ChangeMode(mode), entity="order", stream="s",
        batch_size=batch_size, **change,
    )
    return DbSource(spec, list(ORDER_MAPPING.values()))


def test_incrementing_delivers_each_row_once_in_key_order(
    tmp_path: Path, db_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    engine = create_engine(db_url)
    table = create_orders(engine, 30)
    path = orders_config(tmp_path, db_url=db_url, redis_url=redis_url, stream=stream_name, batch_size=7)

    first = run_once(path)
    assert first.errors == [] and first.rows_read == 30
    assert subjects(redis_client, stream_name) == [str(n) for n in range(1, 31)]

    again = run_once(path)
    assert again.errors == [] and again.rows_read == 0
    assert len(read_stream(redis_client, stream_name)) == 30

    add_orders(engine, table, order_rows(5, first=31))
    later = run_once(path)
    assert later.rows_read == 5
    entries = read_stream(redis_client, stream_name)
    assert [e["event"]["subject"] for e in entries] == [str(n) for n in range(1, 36)]
    assert len({e["event"]["id"] for e in entries}) == 35
    assert orjson.loads(entries[-1]["pos"]) == [35]
    engine.dispose()


def test_timestamp_mode_delivers_an_update_as_a_new_event(
    tmp_path: Path, db_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    engine = create_engine(db_url)
    table = create_orders(engine, 20)
    path = orders_config(tmp_path, db_url=db_url, redis_url=redis_url, stream=stream_name, mode="timestamp")
    assert run_once(path).rows_read == 20

    with engine.begin() as conn:
        conn.execute(
            update(table).where(table.c.ORDER_NO == 5).values(STATUS="SHIPPED", CHANGED_AT=dt.datetime(2027, 2, 1, 9))
        )
    result = run_once(path)
    assert result.errors == [] and result.rows_read == 1
    entries = read_stream(redis_client, stream_name)
    assert len(entries) == 21
    before, after = entries[4]["event"], entries[20]["event"]
    assert before["subject"] == after["subject"] == "5"
    assert before["id"] != after["id"]
    assert after["data"]["status"] == "SHIPPED"
    assert after["data"]["changed_at"] == "2027-02-01T09:00:00+01:00"
    assert run_once(path).rows_read == 0
    engine.dispose()


def test_timestamp_mode_keeps_rows_sharing_a_timestamp_across_batch_and_poll_boundaries(
    tmp_path: Path, db_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    engine = create_engine(db_url)
    table = create_orders(engine, 0)
    same = START + dt.timedelta(hours=3)
    add_orders(engine, table, [{**row, "CHANGED_AT": same} for row in order_rows(10)])
    # batch_size 3 splits each poll among equal timestamps; max_rows_per_poll 4 ends polls among them too.
    path = orders_config(
        tmp_path, db_url=db_url, redis_url=redis_url, stream=stream_name, mode="timestamp",
        batch_size=3, max_rows_per_poll=4,
    )
    config = load_config(path)
    pipeline = build_pipeline(config, config.sources[0])
    outbox = Outbox(config.outbox.path)
    try:
        adopt_streams(RedisBus(redis_client), outbox, [stream_name])
        reads = [poll(pipeline, outbox) for _ in range(4)]
    finally:
        outbox.close()
        pipeline.source.close()
    assert reads == [4, 4, 2, 0]
    # --once polls until caught up, whatever max_rows_per_poll; the relay sends all ten once, in order.
    assert run_once(path).rows_read == 0
    assert subjects(redis_client, stream_name) == [str(n) for n in range(1, 11)]
    engine.dispose()


def test_once_polls_until_caught_up_despite_max_rows_per_poll(
    tmp_path: Path, db_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    engine = create_engine(db_url)
    create_orders(engine, 10)
    path = orders_config(
        tmp_path, db_url=db_url, redis_url=redis_url, stream=stream_name, mode="incrementing", max_rows_per_poll=4
    )
    assert run_once(path).rows_read == 10
    assert subjects(redis_client, stream_name) == [str(n) for n in range(1, 11)]
    engine.dispose()


def test_timestamp_mode_delivers_a_later_row_equal_to_the_watermark(
    tmp_path: Path, db_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    engine = create_engine(db_url)
    table = create_orders(engine, 10)
    path = orders_config(tmp_path, db_url=db_url, redis_url=redis_url, stream=stream_name, mode="timestamp")
    assert run_once(path).rows_read == 10
    with engine.connect() as conn:
        watermark = conn.execute(select(table.c.CHANGED_AT).where(table.c.ORDER_NO == 10)).scalar_one()

    add_orders(engine, table, [{**order_rows(1, first=11)[0], "CHANGED_AT": watermark}])
    result = run_once(path)
    assert result.errors == [] and result.rows_read == 1
    assert subjects(redis_client, stream_name) == [str(n) for n in range(1, 12)]
    assert run_once(path).rows_read == 0
    engine.dispose()


def test_read_streams_a_large_table_in_batches(db_url: str) -> None:
    engine = create_engine(db_url)
    create_orders(engine, 2500)
    source = db_source(db_url, "timestamp", batch_size=1000)
    try:
        batches = list(source.read(None))
    finally:
        source.close()
    assert [len(b.rows) for b in batches] == [1000, 1000, 500]
    # positions are [CHANGED_AT, ORDER_NO]; the fixture's timestamps grow with the key
    keys = [orjson.loads(p)[1] for b in batches for p in b.positions]
    assert keys == list(range(1, 2501))
    stamps = [orjson.loads(p)[0] for b in batches for p in b.positions]
    assert all(a < b for a, b in pairwise(stamps))
    engine.dispose()


def test_watermark_is_a_bound_parameter(db_url: str) -> None:
    engine = create_engine(db_url)
    create_orders(engine, 0)
    incrementing = db_source(db_url, "incrementing")
    timestamp = db_source(db_url, "timestamp")
    try:
        compiled = incrementing.statement(position.encode((7654321,)), None).compile(dialect=engine.dialect)
        assert "7654321" not in str(compiled)
        assert 7654321 in compiled.params.values()

        mark = dt.datetime(2031, 5, 6, 7, 8, 9)
        compiled = timestamp.statement(position.encode((mark, 4242424)), None).compile(dialect=engine.dialect)
        sql = str(compiled)
        assert "2031" not in sql and "4242424" not in sql
        assert mark in compiled.params.values() and 4242424 in compiled.params.values()
    finally:
        incrementing.close()
        timestamp.close()
    engine.dispose()


def codes_config(tmp_path: Path, *, db_url: str, redis_url: str, stream: str) -> Path:
    """The orders config turned to a CODES table keyed by text."""
    path = orders_config(
        tmp_path, db_url=db_url, redis_url=redis_url, stream=stream, table="CODES",
        incrementing_column="CODE", mapping={"code": "CODE", "label": "LABEL"},
    )
    config = yaml.safe_load(path.read_text())
    config["entities"] = {"order": {"key": ["code"], "fields": {"code": "string", "label": "string"}}}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_text_key_with_a_quote_in_incrementing_mode(
    tmp_path: Path, db_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    engine = create_engine(db_url)
    metadata = MetaData()
    codes = Table("CODES", metadata, Column("CODE", String(40), primary_key=True), Column("LABEL", String(60)))
    metadata.create_all(engine)
    # first letters differ, so every collation sorts these the same way
    with engine.begin() as conn:
        conn.execute(insert(codes), [{"CODE": c, "LABEL": f"label {c}"} for c in ("A-1", "M-2", "O'Brien-7")])
    path = codes_config(tmp_path, db_url=db_url, redis_url=redis_url, stream=stream_name)

    assert run_once(path).rows_read == 3
    assert subjects(redis_client, stream_name) == ["A-1", "M-2", "O'Brien-7"]
    assert read_stream(redis_client, stream_name)[-1]["pos"] == orjson.dumps(["O'Brien-7"]).decode()

    with engine.begin() as conn:
        conn.execute(insert(codes), [{"CODE": "B'-0", "LABEL": "late, lower"}, {"CODE": "S'Q-9", "LABEL": "late"}])
    assert run_once(path).rows_read == 1  # B'-0 sorts below the watermark: incrementing keys must only grow
    assert subjects(redis_client, stream_name) == ["A-1", "M-2", "O'Brien-7", "S'Q-9"]
    engine.dispose()
