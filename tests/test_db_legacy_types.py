"""Data legacy systems really hold, read from real databases: cp1252 in byte columns, CHAR padding,
BLOBs, NULL against empty text, naive timestamps around DST changes."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import redis
import yaml
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
        tmp_path, db_url=db_url, redis_url=redis_url, stream=stream, incrementing_column="ID",
        mapping={name: name.upper() for name in fields}, **{"table": "ITEMS", **source},
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
