"""The slice measured end to end, and the naive loop it is compared with.

straw: the real config loader and `Runner(config).run(once=True)`, so the
durable outbox (synchronous=FULL), the relay thread and the exactly-once
protocol are all in the timed path. Naive: what one would write by hand
without straw: fetch the table, JSON-encode each row, one XADD per row.
"""

from __future__ import annotations

import datetime as dt
import shutil
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import yaml
from sqlalchemy import MetaData, Table, create_engine, select

from bench.services import Bench
from fixtures.legacy_orders import ORDER_ENTITY, ORDER_MAPPING
from straw.config_load import load_config
from straw.runner import Runner


def write_config(directory: Path, *, db_url: str, redis_url: str, stream: str) -> Path:
    """A straw.yaml as an operator would write it: defaults for batch sizes, relay and outbox durability."""
    config = {
        "instance": "bench",
        "redis": {"url": redis_url},
        "outbox": {"path": str(directory / "outbox.db")},
        "entities": {"order": ORDER_ENTITY},
        "sources": [
            {
                "name": "erp-orders",
                "kind": "db",
                "url": db_url,
                "table": "ORDERS",
                "mode": "timestamp",
                "timestamp_column": "CHANGED_AT",
                "key_column": "ORDER_NO",
                "timezone": "Europe/Amsterdam",
                "entity": "order",
                "stream": stream,
                "mapping": ORDER_MAPPING,
            }
        ],
    }
    path = directory / "straw.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_straw(bench: Bench, db_url: str, rows: int, *, keep_stream: bool = False) -> tuple[float, str]:
    """Seconds for one `straw run --once` into a fresh stream with a fresh outbox; and the stream."""
    work = bench.workdir("straw")
    stream = bench.stream("straw")
    try:
        config = load_config(write_config(work, db_url=db_url, redis_url=bench.redis_url, stream=stream))
        started = time.perf_counter()
        result = Runner(config).run(once=True)
        elapsed = time.perf_counter() - started
        if result.errors or result.rows_read != rows:
            raise RuntimeError(f"straw run failed: read {result.rows_read} of {rows} rows; {result.errors}")
        _expect_length(bench, stream, rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not keep_stream:
            bench.drop(stream)
    return elapsed, stream


def _row_default(value: Any) -> Any:
    # What a hand-written loop would do: orjson handles dates; money becomes a string.
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, dt.timedelta):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def run_naive(bench: Bench, db_url: str, rows: int) -> float:
    """Seconds for the naive loop: SQLAlchemy fetch, orjson per row, one XADD per row, no pipeline."""
    stream = bench.stream("naive")
    client = bench.redis
    try:
        started = time.perf_counter()
        engine = create_engine(db_url)
        try:
            table = Table("ORDERS", MetaData(), autoload_with=engine)
            with engine.connect() as conn:
                result = conn.execute(select(table).order_by(table.c.CHANGED_AT, table.c.ORDER_NO))
                columns = [str(c.name) for c in table.columns]  # plain str: orjson refuses str subclasses as keys
                for row in result:
                    client.xadd(stream, {"event": orjson.dumps(dict(zip(columns, row, strict=True)),
                                                               default=_row_default)})
        finally:
            engine.dispose()
        elapsed = time.perf_counter() - started
        _expect_length(bench, stream, rows)
    finally:
        bench.drop(stream)
    return elapsed


def _expect_length(bench: Bench, stream: str, rows: int) -> None:
    length = bench.redis.xlen(stream)
    if length != rows:
        raise RuntimeError(f"stream {stream} holds {length} entries, expected {rows}")
