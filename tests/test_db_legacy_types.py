"""Data legacy systems really hold, read from real databases: cp1252 in byte columns, CHAR padding,
BLOBs, NULL against empty text, naive timestamps around DST changes."""

from __future__ import annotations

import datetime as dt
import struct
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import (
    CHAR,
    TIMESTAMP,
    Column,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    create_engine,
    insert,
    text,
)

from adapters.db.engine import make_engine
from tests.helpers import dead_letters, orders_config, read_stream, run_once


def legacy_config(tmp_path: Path, db_url: str, redis_url: str, stream: str, fields: dict[str, Any],
                  **source: Any) -> Path:
    """A source over table ITEMS, incrementing on ID, mapping each field to its upper-case column."""
    path = orders_config(
        tmp_path, db_url=db_url, redis_url=redis_url, stream=stream,
        mapping={name: name.upper() for name in fields}, **{"table": "ITEMS", "incrementing_column": "ID", **source},
    )
    config = yaml.safe_load(path.read_text())
    config["entities"] = {"order": {"key": ["id"], "fields": fields}}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_cp1252_bytes_char_padding_blobs_and_nulls(
    tmp_path: Path, db_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    engine = create_engine(db_url)
    metadata = MetaData()
    items = Table(
        "ITEMS", metadata,
        Column("ID", Integer, primary_key=True, autoincrement=False),
        Column("NAME", LargeBinary), Column("CODE", CHAR(8)), Column("NOTE", String(20)), Column("PHOTO", LargeBinary),
    )
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(items), [
            {"ID": 1, "NAME": "Café € „Grüße“".encode("cp1252"), "CODE": "AB", "NOTE": "", "PHOTO": b"\x00\xff\x10"},
            {"ID": 2, "NAME": b"\x81bad", "CODE": "CD", "NOTE": None, "PHOTO": None},  # 0x81: not a cp1252 byte
            {"ID": 3, "NAME": None, "CODE": "  EF  ", "NOTE": None, "PHOTO": b""},
        ])
    fields = {"id": "integer", "name": "string", "code": "string", "note": "string", "photo": "bytes"}
    path = legacy_config(tmp_path, db_url, redis_url, stream_name, fields, encoding="cp1252", trim_char=True)

    result = run_once(path)
    assert result.errors == [] and result.rows_read == 3
    data = [e["event"]["data"] for e in read_stream(redis_client, stream_name)]
    assert data == [
        {"id": 1, "name": "Café € „Grüße“", "code": "AB", "note": "", "photo": "AP8Q"},
        {"id": 3, "name": None, "code": "  EF", "note": None, "photo": ""},
    ]
    [dead] = dead_letters(tmp_path)
    assert dead["reason"] == "field 'name' (column 'NAME'): bytes are not valid cp1252 at offset 0"
    assert '"$bytes_hex":"81626164"' in dead["raw"]
    engine.dispose()


def test_naive_timestamps_across_dst_changes(
    tmp_path: Path, db_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    """The rule: a wall time that occurs twice (autumn) is read as the first, summer-time one; a wall
    time that never occurred (spring gap) keeps its digits with the offset in force before the gap."""
    engine = create_engine(db_url)
    metadata = MetaData()
    items = Table("ITEMS", metadata, Column("ID", Integer, primary_key=True, autoincrement=False),
                  Column("AT", TIMESTAMP), Column("DAY", TIMESTAMP))
    metadata.create_all(engine)
    stamps = [
        dt.datetime(2026, 3, 29, 1, 59, 59),  # just before the spring change
        dt.datetime(2026, 3, 29, 2, 30),  # does not exist in Amsterdam
        dt.datetime(2026, 3, 29, 3, 0),  # first summer-time moment
        dt.datetime(2026, 10, 25, 2, 30),  # happens twice
        dt.datetime(2026, 10, 25, 3, 0),  # winter time again
    ]
    with engine.begin() as conn:
        conn.execute(insert(items), [
            {"ID": n, "AT": stamp, "DAY": dt.datetime(2026, 3, 29)} for n, stamp in enumerate(stamps, 1)
        ])
    fields = {"id": "integer", "at": "datetime", "day": "date"}
    path = legacy_config(tmp_path, db_url, redis_url, stream_name, fields)
    assert run_once(path).errors == []
    data = [e["event"]["data"] for e in read_stream(redis_client, stream_name)]
    assert [d["at"] for d in data] == [
        "2026-03-29T01:59:59+01:00",
        "2026-03-29T02:30:00+01:00",
        "2026-03-29T03:00:00+02:00",
        "2026-10-25T02:30:00+02:00",
        "2026-10-25T03:00:00+01:00",
    ]
    assert {d["day"] for d in data} == {"2026-03-29"}  # a DATE stays a date, without time or zone
    engine.dispose()


def test_sql_ascii_postgresql_text_is_decoded_by_the_source_encoding(
    tmp_path: Path, sql_ascii_pg_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    """cp1252 bytes in a SQL_ASCII database: text columns decode, a bad byte is a dead letter, params encode."""
    # Plain SQLAlchemy cannot even connect to it (see engine.py); a cp1252 client wrote these rows.
    raw = make_engine(sql_ascii_pg_url, read_only=False, encoding="cp1252")
    with raw.begin() as conn:
        conn.execute(text('CREATE TABLE "ITEMS" ("ID" integer PRIMARY KEY, "NAME" text, "SHOP" varchar(20))'))
        for id_, name in [(1, "Café € „Grüße“"), (2, "\x81bad"), (3, "Caño")]:
            encoded = name.encode("cp1252") if id_ != 2 else b"\x81bad"
            conn.execute(text("INSERT INTO \"ITEMS\" VALUES (:id, convert_from(:name, 'SQL_ASCII'), :shop)"),
                         {"id": id_, "name": encoded, "shop": "España"})
    raw.dispose()
    fields = {"id": "integer", "name": "string"}
    path = legacy_config(tmp_path, sql_ascii_pg_url, redis_url, stream_name, fields, encoding="cp1252",
                         table=None, params={"shop": "España"}, start_value=0,
                         query='SELECT "ID", "NAME" FROM "ITEMS" WHERE "SHOP" = :shop AND "ID" > :last_value')

    result = run_once(path)
    assert result.errors == [] and result.rows_read == 3
    data = [e["event"]["data"] for e in read_stream(redis_client, stream_name)]
    assert data == [{"id": 1, "name": "Café € „Grüße“"}, {"id": 3, "name": "Caño"}]
    [dead] = dead_letters(tmp_path)
    assert dead["reason"] == "field 'name' (column 'NAME'): bytes are not valid cp1252 at offset 0"


def _float32(value: float) -> float:
    """What a single-precision FLOAT column stores for `value`."""
    return float(struct.unpack("<f", struct.pack("<f", value))[0])


FLOATS = [16777217.0, 123.456789, 0.1, -2.5, 3.4028234663852886e38, 1.401298464324817e-45, 1e-30, None]


@pytest.mark.parametrize("shape", ["table", "query", "snapshot"])
def test_a_mariadb_float_column_is_published_with_its_stored_value_not_its_six_digit_text(
    tmp_path: Path, mariadb_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str, shape: str
) -> None:
    """MariaDB/MySQL send a FLOAT (single precision) as text with 6 significant digits: 16777217 is stored
    as 16777216 and reads as 16777200, 123.456789 as 123.457. straw reads it widened to a DOUBLE."""
    engine = create_engine(mariadb_url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE ITEMS (ID INT PRIMARY KEY, R FLOAT, D DOUBLE)"))
        conn.execute(text("INSERT INTO ITEMS VALUES (:i, :r, :d)"),
                     [{"i": i, "r": v, "d": v} for i, v in enumerate(FLOATS, start=1)])
        shown = conn.execute(text("SELECT R FROM ITEMS WHERE ID = 1")).scalar_one()
    engine.dispose()
    assert shown == 16777200.0  # the attack: what the driver gets for the column as it is
    fields = {"id": "integer", "r": "decimal", "d": "decimal"}
    source: dict[str, Any] = {"settle": "off"}  # values, not commits: others' open transactions hold nothing back
    if shape == "query":
        source |= {"table": None, "query": "SELECT ID, R, D FROM ITEMS"}
    elif shape == "snapshot":
        source |= {"mode": "snapshot", "incrementing_column": None, "timestamp_column": None, "key_column": None}
    path = legacy_config(tmp_path, mariadb_url, redis_url, stream_name, fields, **source)

    result = run_once(path)
    assert result.errors == [] and result.rows_read == len(FLOATS)
    data = {e["event"]["data"]["id"]: e["event"]["data"] for e in read_stream(redis_client, stream_name)}
    assert dead_letters(tmp_path) == []
    for i, value in enumerate(FLOATS, start=1):
        if value is None:
            assert data[i]["r"] is None and data[i]["d"] is None
            continue
        assert Decimal(data[i]["r"]) == Decimal(repr(_float32(value))), (value, data[i]["r"])
        assert Decimal(data[i]["d"]) == Decimal(repr(value))  # a DOUBLE was right before: still right
    assert Decimal(data[1]["r"]) == 16777216

    if shape == "snapshot":  # an unchanged FLOAT keeps its digest and its value: nothing sent again
        assert run_once(path).errors == []
        assert len(read_stream(redis_client, stream_name)) == len(FLOATS)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=1, max_size=40))
def test_any_float_a_mariadb_float_or_double_column_holds_is_published_exactly(
    tmp_path_factory: pytest.TempPathFactory, mariadb_url: str, redis_url: str, redis_client: redis.Redis,
    stream_name: str, values: list[float],
) -> None:
    directory = tmp_path_factory.mktemp("floats")
    stream = f"{stream_name}.{directory.name}"
    engine = create_engine(mariadb_url)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS ITEMS"))
        conn.execute(text("CREATE TABLE ITEMS (ID INT PRIMARY KEY, R FLOAT, D DOUBLE)"))
        stored = []
        for i, value in enumerate(values, start=1):
            single = _float32(value) if abs(value) <= 3.4028234663852886e38 else None  # beyond: out of range
            conn.execute(text("INSERT INTO ITEMS VALUES (:i, :r, :d)"), {"i": i, "r": single, "d": value})
            stored.append((i, single, value))
    engine.dispose()
    path = legacy_config(directory, mariadb_url, redis_url, stream, {"id": "integer", "r": "decimal", "d": "decimal"},
                         settle="off")  # values, not commits: other tests' open transactions must not hold rows back
    try:
        result = run_once(path)
        assert result.errors == [] and result.rows_read == len(values)
        data = {e["event"]["data"]["id"]: e["event"]["data"] for e in read_stream(redis_client, stream)}
        for i, single, double in stored:
            assert (data[i]["r"] is None) if single is None else Decimal(data[i]["r"]) == Decimal(repr(single))
            assert Decimal(data[i]["d"]) == Decimal(repr(double)), (double, data[i]["d"])
    finally:
        redis_client.delete(stream)


MONEY = ["1234567.89", "-0.01", "0.00", "92233720368547758.07", "-92233720368547758.08", None]


@pytest.mark.parametrize("shape", ["table", "query"])
def test_a_postgresql_money_column_is_published_as_its_amount_not_its_locale_text(
    tmp_path: Path, pg_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str, shape: str
) -> None:
    """psycopg gives a money value as PostgreSQL formats it for lc_monetary (`$1,234,567.89`), which no
    decimal reads: every row was a dead letter. straw reads it as a numeric, exact."""
    engine = create_engine(pg_url)
    with engine.begin() as conn:
        conn.execute(text('CREATE TABLE "ITEMS" ("ID" INT PRIMARY KEY, "PRICE" MONEY)'))
        conn.execute(text('INSERT INTO "ITEMS" VALUES (:i, CAST(:p AS NUMERIC))'),
                     [{"i": i, "p": p} for i, p in enumerate(MONEY, start=1)])
        shown = conn.execute(text('SELECT "PRICE" FROM "ITEMS" WHERE "ID" = 1')).scalar_one()
    engine.dispose()
    assert shown == "$1,234,567.89"  # the attack: what the driver gets for the column as it is
    source: dict[str, Any] = {"settle": "off"}  # values, not commits
    if shape == "query":
        source |= {"table": None, "query": 'SELECT "ID", "PRICE" FROM "ITEMS"'}
    fields = {"id": "integer", "price": {"type": "decimal", "scale": 2}}
    path = legacy_config(tmp_path, pg_url, redis_url, stream_name, fields, **source)

    result = run_once(path)
    assert result.errors == [] and result.rows_read == len(MONEY)
    assert dead_letters(tmp_path) == []
    data = {e["event"]["data"]["id"]: e["event"]["data"]["price"] for e in read_stream(redis_client, stream_name)}
    assert data == dict(enumerate(MONEY, start=1))
