"""The slice end to end on SQLite: rows land once, a re-run adds nothing, a change adds exactly it."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import redis
from sqlalchemy import create_engine, update

from fixtures.legacy_orders import create_orders
from tests.helpers import orders_config, read_stream, run_once


def test_rows_land_once_and_changes_land_again(
    tmp_path: Path, sqlite_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    engine = create_engine(sqlite_url)
    table = create_orders(engine, 50)
    path = orders_config(tmp_path, db_url=sqlite_url, redis_url=redis_url, stream=stream_name, mode="timestamp")

    assert run_once(path).errors == []
    first = read_stream(redis_client, stream_name)
    assert [e["event"]["subject"] for e in first] == [str(n) for n in range(1, 51)]

    assert run_once(path).rows_read == 0
    assert len(read_stream(redis_client, stream_name)) == 50

    with engine.begin() as conn:
        conn.execute(
            update(table).where(table.c.ORDER_NO == 7).values(STATUS="SHIPPED", CHANGED_AT=dt.datetime(2027, 1, 1))
        )
    run_once(path)
    entries = read_stream(redis_client, stream_name)
    assert len(entries) == 51
    last = entries[-1]["event"]
    assert last["subject"] == "7" and last["data"]["status"] == "SHIPPED"
    assert last["id"] != entries[6]["event"]["id"]
    engine.dispose()
