"""Rows that fail their schema become dead letters: kept with reason and raw row, never blocking the rest."""

from __future__ import annotations

import re
from pathlib import Path

import orjson
import redis
from sqlalchemy import CHAR, DATE, DECIMAL, TIMESTAMP, Column, Integer, MetaData, String, Table, create_engine, insert
from sqlalchemy import text as sql
from typer.testing import CliRunner

from fixtures.legacy_orders import order_rows
from outbox.store import Outbox
from straw.cli import app
from tests.helpers import dead_letters, orders_config, read_stream, run_once


def loose_orders(metadata: MetaData) -> Table:
    """The fixture's ORDERS, as a legacy schema that lets bad values in: AMOUNT nullable, PAID free text."""
    return Table(
        "ORDERS",
        metadata,
        Column("ORDER_NO", Integer, primary_key=True, autoincrement=False),
        Column("CUST_NAME", String(60), nullable=False),
        Column("AMOUNT", DECIMAL(12, 2)),
        Column("CURRENCY", CHAR(3), nullable=False),
        Column("ORDER_DATE", DATE, nullable=False),
        Column("STATUS", String(12), nullable=False),
        Column("PAID", String(10), nullable=False),
        Column("NOTE", String(200)),
        Column("CHANGED_AT", TIMESTAMP, nullable=False),
    )


def fill_loose_orders(url: str, rows: list[dict[str, object]]) -> None:
    """A loose ORDERS table in the database at `url`, holding `rows`."""
    engine = create_engine(url)
    metadata = MetaData()
    table = loose_orders(metadata)
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(table), rows)
    engine.dispose()


def source_position(tmp_path: Path) -> str | None:
    outbox = Outbox(tmp_path / "outbox.db")
    try:
        return outbox.position("orders")
    finally:
        outbox.close()


def test_bad_rows_go_to_dead_letters_and_the_rest_flows(
    tmp_path: Path, db_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    rows = order_rows(6)
    rows[1]["AMOUNT"] = None  # required field
    rows[5]["PAID"] = "maybe"  # not a boolean word; also the batch's last row
    fill_loose_orders(db_url, rows)
    path = orders_config(tmp_path, db_url=db_url, redis_url=redis_url, stream=stream_name)

    result = run_once(path)
    assert result.errors == [] and result.rows_read == 6
    assert [e["event"]["subject"] for e in read_stream(redis_client, stream_name)] == ["1", "3", "4", "5"]

    null_amount, bad_flag = dead_letters(tmp_path)
    assert null_amount["position"] == "[2]"
    assert "'amount'" in null_amount["reason"] and "'AMOUNT'" in null_amount["reason"]
    assert "null" in null_amount["reason"]
    raw = orjson.loads(null_amount["raw"])
    assert raw["ORDER_NO"] == 2 and raw["AMOUNT"] is None and raw["CUST_NAME"] == rows[1]["CUST_NAME"]

    assert bad_flag["position"] == "[6]"
    assert "'paid'" in bad_flag["reason"] and "'PAID'" in bad_flag["reason"] and "maybe" in bad_flag["reason"]
    assert orjson.loads(bad_flag["raw"])["PAID"] == "maybe"

    # the position moved past the dead rows, so they are not read again
    assert source_position(tmp_path) == "[6]"
    assert run_once(path).rows_read == 0
    assert len(dead_letters(tmp_path)) == 2


def test_sqlite_text_in_a_decimal_column_is_a_dead_letter(
    tmp_path: Path, sqlite_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    engine = create_engine(sqlite_url)
    metadata = MetaData()
    table = loose_orders(metadata)
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(table), order_rows(5))
        # SQLite keeps whatever it is given, whatever the declared type: old apps wrote text into money
        conn.execute(sql("UPDATE ORDERS SET AMOUNT = 'twelve' WHERE ORDER_NO = 3"))
        conn.execute(sql("UPDATE ORDERS SET AMOUNT = '12.50' WHERE ORDER_NO = 4"))
    path = orders_config(tmp_path, db_url=sqlite_url, redis_url=redis_url, stream=stream_name)

    result = run_once(path)
    assert result.errors == [] and result.rows_read == 5
    events = [e["event"] for e in read_stream(redis_client, stream_name)]
    assert [e["subject"] for e in events] == ["1", "2", "4", "5"]
    assert events[2]["data"]["amount"] == "12.50"
    [dead] = dead_letters(tmp_path)
    assert dead["position"] == "[3]"
    assert "'amount'" in dead["reason"] and "'twelve'" in dead["reason"]
    assert orjson.loads(dead["raw"])["AMOUNT"] == "twelve"
    assert source_position(tmp_path) == "[5]"
    engine.dispose()


def cells(output: str, first: str) -> list[str]:
    """The cells of the table row whose first cell is `first`."""
    for line in output.splitlines():
        parts = [p.strip() for p in re.split("[│┃]", line)]
        if len(parts) > 2 and parts[1] == first:
            return parts[1:-1]
    raise AssertionError(f"no row {first!r} in:\n{output}")


def test_cli_shows_dead_letters(
    tmp_path: Path, sqlite_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    engine = create_engine(sqlite_url)
    metadata = MetaData()
    table = loose_orders(metadata)
    metadata.create_all(engine)
    rows = order_rows(3)
    # legacy text with brackets must show as written, not be taken for console markup
    rows[1].update(PAID="?", NOTE="[urgent] see [/b] note")
    with engine.begin() as conn:
        conn.execute(insert(table), rows)
    path = orders_config(tmp_path, db_url=sqlite_url, redis_url=redis_url, stream=stream_name)
    assert run_once(path).errors == []

    runner = CliRunner()
    wide = {"COLUMNS": "400"}
    listed = runner.invoke(app, ["dead-letters", "--config", str(path)], env=wide)
    assert listed.exit_code == 0, listed.output
    row = cells(listed.output, "1")
    assert row[1:3] == ["orders", "[2]"]
    assert "field 'paid' (column 'PAID')" in row[3]
    assert orjson.loads(row[4]) == orjson.loads(dead_letters(tmp_path)[0]["raw"])
    assert orjson.loads(row[4])["NOTE"] == "[urgent] see [/b] note"

    status = runner.invoke(app, ["status", "--config", str(path)], env=wide)
    assert status.exit_code == 0, status.output
    header = cells(status.output, "source")
    source = cells(status.output, "orders")
    assert source[header.index("dead letters")] == "1"
    assert source[header.index("read")] == "3" and source[header.index("published")] == "2"
    engine.dispose()


def test_a_key_listed_twice_in_a_snapshot_is_one_dead_letter_never_re_emitted(
    tmp_path: Path, db_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    """A table without a primary key holding (2,'b1') and (2,'b2'): both upserts were re-sent at every listing."""
    from fixtures.legacy_orders import create_orders

    engine = create_engine(db_url)
    create_orders(engine, 7)
    q = engine.dialect.identifier_preparer.quote
    dups, orders, number, name = q("DUPS"), q("ORDERS"), q("ORDER_NO"), q("CUST_NAME")
    with engine.begin() as conn:
        conn.execute(sql(f"CREATE TABLE {dups} AS SELECT * FROM {orders}"))
        conn.execute(sql(f"INSERT INTO {dups} SELECT * FROM {orders} WHERE {number} IN (2, 4)"))
        conn.execute(sql(f"UPDATE {dups} SET {name} = 'b1' WHERE {number} IN (2, 4)"))
        conn.execute(sql(f"INSERT INTO {dups} SELECT * FROM {orders} WHERE {number} = 4"))  # three of 4
    engine.dispose()
    # batch_size 2: the rows of one key straddle a batch boundary unless the poller keeps them together
    path = orders_config(tmp_path, db_url=db_url, redis_url=redis_url, stream=stream_name, mode="snapshot",
                         table="DUPS", batch_size=2, timestamp_column=None, key_column=None)
    for _ in range(3):
        assert not run_once(path).errors
    subjects = [e["event"]["subject"] for e in read_stream(redis_client, stream_name)]
    assert subjects == ["1", "3", "5", "6", "7"]  # each once, and never 2 or 4
    dead = dead_letters(tmp_path)
    assert [(d["position"].split(",")[1], d["reason"].split(" (")[0]) for d in dead] == [
        ("2]", "key '2' is listed 2 times in one listing"),
        ("4]", "key '4' is listed 3 times in one listing"),
    ]
    names = sorted(r["CUST_NAME"] for r in orjson.loads(dead[0]["raw"]))  # every row of the key, as read
    assert len(names) == 2 and "b1" in names
