"""Custom queries with :last_value, the settle delay of timestamp mode, and soft deletes, on real databases."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import redis
from sqlalchemy import CHAR, Column, MetaData, String, Table, create_engine, insert, update
from sqlalchemy.engine import Engine

from fixtures.legacy_orders import create_orders, order_rows
from tests.helpers import ORDER_MAPPING, orders_config, read_stream, run_once


@pytest.fixture(params=["postgresql", "mariadb"])
def server_url(request: pytest.FixtureRequest) -> str:
    """Databases where a second connection can hold a write open while straw reads."""
    return str(request.getfixturevalue("pg_url" if request.param == "postgresql" else "mariadb_url"))


@pytest.fixture
def other_stream(redis_client: redis.Redis) -> Iterator[str]:
    name = f"test.{uuid.uuid4().hex[:12]}.plain"
    yield name
    for key in redis_client.scan_iter(match=f"*{name}*"):
        redis_client.delete(key)


def events(client: redis.Redis, stream: str) -> list[dict[str, Any]]:
    return [e["event"] for e in read_stream(client, stream)]


def amsterdam_now() -> dt.datetime:
    """The sources' configured zone (naive legacy timestamps); the databases run on this host's clock."""
    return dt.datetime.now(ZoneInfo("Europe/Amsterdam")).replace(tzinfo=None, microsecond=0)


def test_settle_delay_delivers_a_row_committed_late_with_an_older_timestamp(
    tmp_path: Path, server_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str,
    other_stream: str,
) -> None:
    engine = create_engine(server_url)
    table = create_orders(engine, 0)
    settled = tmp_path / "settled"
    plain = tmp_path / "plain"
    settled.mkdir()
    plain.mkdir()

    def run(directory: Path, stream: str, delay: float) -> int:
        # delay 0 here is `settle: off`, the old default: tests/test_db_commit_safe.py proves `settle: auto`
        settle: dict[str, Any] = {"settle_delay": delay} if delay else {"settle": "off"}
        path = orders_config(directory, db_url=server_url, redis_url=redis_url, stream=stream, mode="timestamp",
                             **settle)
        result = run_once(path)
        assert result.errors == []
        return int(result.rows_read)

    now = amsterdam_now()
    early, late = order_rows(2)
    with engine.connect() as slow:
        slow_txn = slow.begin()
        slow.execute(insert(table), [{**early, "CHANGED_AT": now - dt.timedelta(seconds=40)}])
        with engine.begin() as fast:  # commits first, with the newer timestamp
            fast.execute(insert(table), [{**late, "CHANGED_AT": now - dt.timedelta(seconds=30)}])
        assert run(plain, other_stream, 0) == 1
        assert run(settled, stream_name, 600) == 0  # both are younger than the settle delay
        slow_txn.commit()
    # With `settle: off` the late row is behind the watermark already, and lost.
    assert run(plain, other_stream, 0) == 0
    assert [e["subject"] for e in events(redis_client, other_stream)] == ["2"]
    assert run(settled, stream_name, 600) == 0
    assert run(settled, stream_name, 10) == 2
    assert [e["subject"] for e in events(redis_client, stream_name)] == ["1", "2"]
    engine.dispose()


def currencies(engine: Engine) -> None:
    metadata = MetaData()
    table = Table(
        "CURRENCIES", metadata,
        Column("CODE", CHAR(3), primary_key=True), Column("LABEL", String(30)), Column("ACTIVE", CHAR(1)),
    )
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(table), [
            {"CODE": "EUR", "LABEL": "Euro", "ACTIVE": "J"},
            {"CODE": "USD", "LABEL": "US dollar", "ACTIVE": "J"},
            {"CODE": "GBP", "LABEL": "Pound sterling", "ACTIVE": "N"},
        ])


def join_query(engine: Engine, where: str) -> str:
    q = engine.dialect.identifier_preparer.quote
    columns = ", ".join(f"o.{q(c)}" for c in ORDER_MAPPING.values() if c != "CURRENCY")
    return (
        f"SELECT {columns}, c.{q('LABEL')} AS {q('CURRENCY_LABEL')} "
        f"FROM {q('ORDERS')} o JOIN {q('CURRENCIES')} c ON c.{q('CODE')} = o.{q('CURRENCY')} "
        f"WHERE c.{q('ACTIVE')} = :active AND {where}"
    )


LABELS = {"EUR": "Euro", "USD": "US dollar"}


@pytest.mark.parametrize("mode", ["incrementing", "timestamp", "snapshot"])
def test_custom_query_joins_and_binds_last_value_and_params(
    tmp_path: Path, db_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str, mode: str
) -> None:
    engine = create_engine(db_url)
    table = create_orders(engine, 12)
    currencies(engine)
    q = engine.dialect.identifier_preparer.quote
    where = {
        "incrementing": f"o.{q('ORDER_NO')} > :last_value",
        # timestamp mode: >= inside; straw's own tie-breaker outside keeps rows sharing the last timestamp
        "timestamp": f"o.{q('CHANGED_AT')} >= :last_value",
        "snapshot": "1 = 1",
    }[mode]
    source: dict[str, Any] = {
        "table": None, "query": join_query(engine, where), "params": {"active": "J"},
        "mapping": {**ORDER_MAPPING, "currency": "CURRENCY_LABEL"},
    }
    if mode == "incrementing":
        source["start_value"] = 0
    elif mode == "timestamp":
        source["start_value"] = "1900-01-01 00:00:00"
    else:
        source.update(timestamp_column=None, key_column=None)
    path = orders_config(tmp_path, db_url=db_url, redis_url=redis_url, stream=stream_name, mode=mode, **source)

    def expected(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
        return [(str(r["ORDER_NO"]), LABELS[str(r["CURRENCY"])]) for r in rows if r["CURRENCY"] != "GBP"]

    assert run_once(path).errors == []
    seen = [(e["subject"], e["data"]["currency"]) for e in events(redis_client, stream_name)]
    assert seen == expected(order_rows(12)) and len(seen) < 12  # GBP orders are filtered by :active

    with engine.begin() as conn:
        conn.execute(insert(table), order_rows(6, first=13))
    assert run_once(path).errors == []
    seen = [(e["subject"], e["data"]["currency"]) for e in events(redis_client, stream_name)]
    assert seen == expected(order_rows(12) + order_rows(6, first=13))
    engine.dispose()


def test_soft_delete_flag_turns_a_row_into_a_deleted_event(
    tmp_path: Path, db_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    engine = create_engine(db_url)
    table = create_orders(engine, 8)
    path = orders_config(
        tmp_path, db_url=db_url, redis_url=redis_url, stream=stream_name, mode="timestamp",
        soft_delete={"column": "STATUS", "value": "CANCELLED"},
    )
    assert run_once(path).errors == []
    cancelled = {str(r["ORDER_NO"]) for r in order_rows(8) if r["STATUS"] == "CANCELLED"}
    first = events(redis_client, stream_name)
    assert {e["subject"] for e in first if e["type"] == "order.deleted"} == cancelled
    assert {e["subject"] for e in first if e["type"] == "order.upserted"} == {str(n) for n in range(1, 9)} - cancelled

    live = min({n for n in range(1, 9)} - {int(c) for c in cancelled})
    with engine.begin() as conn:
        cancel = update(table).values(STATUS="CANCELLED", CHANGED_AT=dt.datetime(2027, 1, 1))
        conn.execute(cancel.where(live == table.c.ORDER_NO))
    assert run_once(path).errors == []
    last = events(redis_client, stream_name)[-1]
    assert (last["type"], last["subject"], last["data"]) == ("order.deleted", str(live), {"order_no": live})
    engine.dispose()


def test_postgresql_xmin_recipe_sees_inserts_and_updates(
    tmp_path: Path, pg_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    """The README's vendor change column: incrementing on the row's transaction id."""
    engine = create_engine(pg_url)
    table = create_orders(engine, 5)
    path = orders_config(
        tmp_path, db_url=pg_url, redis_url=redis_url, stream=stream_name, table=None,
        query='SELECT t.*, t.xmin::text::bigint AS row_xid FROM "ORDERS" t', incrementing_column="row_xid",
    )
    assert run_once(path).errors == []
    with engine.begin() as conn:
        conn.execute(update(table).where(table.c.ORDER_NO == 2).values(STATUS="SHIPPED"))
    assert run_once(path).errors == []
    later = events(redis_client, stream_name)[5:]
    assert [(e["subject"], e["data"]["status"]) for e in later] == [("2", "SHIPPED")]
    engine.dispose()


def test_settle_delay_in_query_mode_compares_a_zoned_column_as_zoned(
    tmp_path: Path, pg_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    """A query's column types are unknown until a row is read: a `timestamptz` column must get a zoned cutoff.

    Amsterdam is UTC+1 in November and the server's session zone is UTC: a naive
    Amsterdam cutoff read as UTC would let an hour of unsettled rows through.
    """
    engine = create_engine(pg_url)
    table = create_orders(engine, 0)
    now = amsterdam_now()
    old, recent = order_rows(2)
    with engine.begin() as conn:
        conn.execute(insert(table), [{**old, "CHANGED_AT": now - dt.timedelta(hours=2)},
                                     {**recent, "CHANGED_AT": now - dt.timedelta(seconds=30)}])
    columns = ", ".join(f'"{c}"' for c in ORDER_MAPPING.values() if c != "CHANGED_AT")
    query = (f"SELECT {columns}, \"CHANGED_AT\" AT TIME ZONE 'Europe/Amsterdam' AS \"CHANGED_AT\" "
             'FROM "ORDERS" WHERE "CHANGED_AT" AT TIME ZONE \'Europe/Amsterdam\' >= :last_value')
    path = orders_config(tmp_path, db_url=pg_url, redis_url=redis_url, stream=stream_name, mode="timestamp",
                         table=None, query=query, start_value="1900-01-01 00:00:00+00:00", settle_delay=600)
    assert run_once(path).errors == []
    assert [e["subject"] for e in events(redis_client, stream_name)] == ["1"]  # the recent row waits
    engine.dispose()
