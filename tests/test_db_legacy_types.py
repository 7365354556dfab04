"""Data legacy systems really hold, read from real databases: cp1252 in byte columns, CHAR padding,
BLOBs, NULL against empty text, naive timestamps around DST changes."""

from __future__ import annotations

import datetime as dt
import struct
import uuid
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


def shaped(shape: str, query: str) -> dict[str, Any]:
    """The source options of a value test read as a `table` (incrementing on ID), a `query` or a `snapshot`.
    Values, not commits: settle off, so other tests' open transactions hold no row back."""
    if shape == "query":
        return {"settle": "off", "table": None, "query": query}
    if shape == "snapshot":
        return {"settle": "off", "mode": "snapshot", "incrementing_column": None, "timestamp_column": None,
                "key_column": None}
    return {"settle": "off"}


def example_dir(factory: pytest.TempPathFactory, name: str, stream_name: str) -> tuple[Path, str]:
    """A hypothesis example's own directory (outbox) and stream: examples share the test's fixtures."""
    directory = factory.mktemp(name)
    return directory, f"{stream_name}.{directory.name}"


def fresh_items(conn: Any, columns: str) -> None:
    """Table ITEMS anew (the previous example's is dropped), keyed by ID, with these columns."""
    conn.execute(text("DROP TABLE IF EXISTS ITEMS"))
    conn.execute(text(f"CREATE TABLE ITEMS (ID INT PRIMARY KEY, {columns})"))


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
    source = shaped(shape, "SELECT ID, R, D FROM ITEMS")
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
    directory, stream = example_dir(tmp_path_factory, "floats", stream_name)
    engine = create_engine(mariadb_url)
    with engine.begin() as conn:
        fresh_items(conn, "R FLOAT, D DOUBLE")
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
    source = shaped(shape, 'SELECT "ID", "PRICE" FROM "ITEMS"')
    fields = {"id": "integer", "price": {"type": "decimal", "scale": 2}}
    path = legacy_config(tmp_path, pg_url, redis_url, stream_name, fields, **source)

    result = run_once(path)
    assert result.errors == [] and result.rows_read == len(MONEY)
    assert dead_letters(tmp_path) == []
    data = {e["event"]["data"]["id"]: e["event"]["data"]["price"] for e in read_stream(redis_client, stream_name)}
    assert data == dict(enumerate(MONEY, start=1))


# MariaDB's own text of each TIME: a duration of up to ±838:59:59, not a time of day.
TIMES = ["-00:00:01", "838:59:59", "-838:59:59", "09:30:00", "00:00:00", None]
UUID_TEXT = "5f0c6e2a-9b1d-4c3e-8f7a-1b2c3d4e5f60"


@pytest.mark.parametrize("shape", ["table", "query", "snapshot"])
def test_mariadb_time_set_bit_year_and_uuid_columns_are_published_as_stored(
    tmp_path: Path, mariadb_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str, shape: str
) -> None:
    """SQLAlchemy reads a table's TIME as a time of day modulo 24 h (-00:00:01 published as 23:59:59,
    838:59:59 as 22:59:59) and a query's comes as a timedelta (a dead letter); a SET came as a Python set,
    a query's BIT as bytes. Each is published as the database keeps it."""
    engine = create_engine(mariadb_url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE ITEMS (ID INT PRIMARY KEY, TM TIME, TM6 TIME(6), S SET('x', 'y', 'z'), "
                          "B1 BIT(1), B BIT(10), Y YEAR, U UUID)"))
        conn.execute(text("INSERT INTO ITEMS VALUES (:i, :tm, :tm6, :s, :b1, :b, :y, :u)"), [
            {"i": i, "tm": tm, "tm6": "12:00:00.000001" if i == 1 else None, "s": "z,x" if i == 1 else None,
             "b1": i % 2 if tm else None, "b": 5 if i == 1 else None, "y": 2024 if i == 1 else None,
             "u": UUID_TEXT if i == 1 else None}
            for i, tm in enumerate(TIMES, start=1)
        ])
        shown = conn.execute(text("SELECT TM FROM ITEMS WHERE ID = 1")).scalar_one()
        reflected = conn.execute(Table("ITEMS", MetaData(), autoload_with=conn).select()).first()
    engine.dispose()
    assert shown == dt.timedelta(seconds=-1)  # the attack: what a query's driver value is
    assert reflected is not None and reflected.TM.isoformat() == "23:59:59"  # and a reflected table's
    fields = {"id": "integer", "tm": "string", "tm6": "string", "s": "string", "b1": "boolean", "b": "integer",
              "y": "integer", "u": "string"}
    source = shaped(shape, "SELECT ID, TM, TM6, S, B1, B, Y, U FROM ITEMS")
    path = legacy_config(tmp_path, mariadb_url, redis_url, stream_name, fields, **source)

    result = run_once(path)
    assert result.errors == [] and result.rows_read == len(TIMES)
    assert dead_letters(tmp_path) == []
    data = {e["event"]["data"]["id"]: e["event"]["data"] for e in read_stream(redis_client, stream_name)}
    assert {i: d["tm"] for i, d in data.items()} == dict(enumerate(TIMES, start=1))
    assert data[1] == {"id": 1, "tm": "-00:00:01", "tm6": "12:00:00.000001", "s": "x,z", "b1": True, "b": 5,
                       "y": 2024, "u": UUID_TEXT}
    assert (data[2]["b1"], data[6]["b1"], data[6]["s"], data[6]["u"]) == (False, None, None, None)

    if shape == "snapshot":  # an unchanged row keeps its digest: nothing sent again
        assert run_once(path).errors == []
        assert len(read_stream(redis_client, stream_name)) == len(TIMES)


@pytest.mark.parametrize("shape", ["table", "query"])
def test_postgresql_interval_inet_and_uuid_columns_are_published_as_stored(
    tmp_path: Path, pg_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str, shape: str
) -> None:
    """psycopg makes an interval a timedelta with a month of 30 days ('1 mon' and '30 days' become one
    value), an inet an ipaddress object that spells '10.0.0.1' as '10.0.0.1/32', a uuid a UUID object (a
    dead letter in a string field). Each is published as PostgreSQL spells it."""
    engine = create_engine(pg_url)
    rows = [
        (1, "1 mon", "10.0.0.1", "192.168.0.0/16", UUID_TEXT),
        (2, "30 days", "10.0.0.1/8", "10.0.0.0/8", None),
        (3, "-1 years -2 mons +3 days -04:05:06.5", "::1", "2001:db8::/32", None),
        (4, None, None, None, None),
    ]
    with engine.begin() as conn:
        conn.execute(text('CREATE TABLE "ITEMS" ("ID" INT PRIMARY KEY, "IV" INTERVAL, "IP" INET, "NET" CIDR, '
                          '"U" UUID)'))
        conn.execute(text('INSERT INTO "ITEMS" VALUES (:i, CAST(:iv AS INTERVAL), CAST(:ip AS INET), '
                          'CAST(:net AS CIDR), CAST(:u AS UUID))'),
                     [{"i": i, "iv": iv, "ip": ip, "net": net, "u": u} for i, iv, ip, net, u in rows])
        shown = [r[0] for r in conn.execute(text('SELECT "IV" FROM "ITEMS" WHERE "ID" < 3 ORDER BY "ID"'))]
        spelled = conn.execute(text('SELECT CAST("IV" AS TEXT) FROM "ITEMS" ORDER BY "ID"')).scalars().all()
    engine.dispose()
    assert shown[0] == shown[1] == dt.timedelta(days=30)  # the attack: two stored values, one driver value
    source = shaped(shape, 'SELECT "ID", "IV", "IP", "NET", "U" FROM "ITEMS"')
    fields = {"id": "integer", "iv": "string", "ip": "string", "net": "string", "u": "string"}
    path = legacy_config(tmp_path, pg_url, redis_url, stream_name, fields, **source)

    result = run_once(path)
    assert result.errors == [] and result.rows_read == len(rows)
    assert dead_letters(tmp_path) == []
    data = {e["event"]["data"]["id"]: e["event"]["data"] for e in read_stream(redis_client, stream_name)}
    assert [data[i]["iv"] for i in range(1, 5)] == spelled
    assert spelled[:2] == ["1 mon", "30 days"]
    assert [data[i]["ip"] for i in range(1, 5)] == ["10.0.0.1", "10.0.0.1/8", "::1", None]
    assert [data[i]["net"] for i in range(1, 5)] == ["192.168.0.0/16", "10.0.0.0/8", "2001:db8::/32", None]
    assert [data[i]["u"] for i in range(1, 5)] == [UUID_TEXT, None, None, None]


@pytest.mark.parametrize("database", ["postgresql", "mariadb"])
@pytest.mark.parametrize("mode", ["snapshot", "timestamp"])
def test_a_uuid_key_resumes_lists_and_publishes_as_its_text(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, stream_name: str, database: str, mode: str,
    request: pytest.FixtureRequest,
) -> None:
    """Legacy tables keyed by a UUID: the key is kept in the position between batches (a UUID object), and
    the next batch asks for the keys after it."""
    url = str(request.getfixturevalue("pg_url" if database == "postgresql" else "mariadb_url"))
    keys = sorted(str(uuid.UUID(int=n * 0x1111_1111_1111_1111_1111)) for n in range(1, 8))
    quote = '"' if database == "postgresql" else "`"
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(f"CREATE TABLE {quote}ITEMS{quote} ({quote}U{quote} UUID PRIMARY KEY, "
                          f"{quote}CHANGED_AT{quote} TIMESTAMP NOT NULL)"))
        conn.execute(text(f"INSERT INTO {quote}ITEMS{quote} VALUES (:u, :at)"),
                     [{"u": k, "at": dt.datetime(2026, 1, 1)} for k in keys])  # one time: the key orders them
    engine.dispose()
    source: dict[str, Any] = {"settle": "off", "batch_size": 2, "incrementing_column": None, "mode": mode}
    if mode == "timestamp":
        source |= {"timestamp_column": "CHANGED_AT", "key_column": "U"}
    else:
        source |= {"timestamp_column": None, "key_column": None}
    path = legacy_config(tmp_path, url, redis_url, stream_name, {"u": "string"}, **source)
    config = yaml.safe_load(path.read_text())
    config["entities"]["order"]["key"] = ["u"]
    path.write_text(yaml.safe_dump(config, sort_keys=False))

    result = run_once(path)
    assert result.errors == [] and result.rows_read == len(keys)
    assert dead_letters(tmp_path) == []
    published = [e["event"]["data"]["u"] for e in read_stream(redis_client, stream_name)]
    assert published == keys  # each once, in key order, as the database spells it
    assert run_once(path).errors == []  # a second poll resumes after the last key: nothing again
    assert len(read_stream(redis_client, stream_name)) == len(keys)


def test_a_postgresql_time_of_24_00_is_a_dead_letter_and_the_other_times_are_iso(
    tmp_path: Path, pg_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    """PostgreSQL allows 24:00:00 as a time; Python's time does not (psycopg fails the whole fetch)."""
    engine = create_engine(pg_url)
    with engine.begin() as conn:
        conn.execute(text('CREATE TABLE "ITEMS" ("ID" INT PRIMARY KEY, "T" TIME, "TZ" TIMETZ)'))
        conn.execute(text('INSERT INTO "ITEMS" VALUES (1, \'09:30\', \'09:30+02\'), (2, \'24:00\', \'23:59:59.5-05\'), '
                          "(3, '00:00', NULL)"))
    engine.dispose()
    path = legacy_config(tmp_path, pg_url, redis_url, stream_name, {"id": "integer", "t": "string", "tz": "string"},
                         settle="off")
    result = run_once(path)
    assert result.errors == [] and result.rows_read == 3
    data = [e["event"]["data"] for e in read_stream(redis_client, stream_name)]
    assert data == [{"id": 1, "t": "09:30:00", "tz": "09:30:00+02:00"}, {"id": 3, "t": "00:00:00", "tz": None}]
    [dead] = dead_letters(tmp_path)
    assert dead["reason"].startswith("field 't' (column 'T'): the database driver cannot read '24:00:00'")
    assert run_once(path).errors == []  # the position moved past it: nothing read again
    assert len(read_stream(redis_client, stream_name)) == 2


def _mysql_time_text(value: dt.timedelta) -> str:
    """MySQL's spelling of a TIME(6): [-]HH:MM:SS.ffffff, hours past 24 as they are."""
    micros = abs(value) // dt.timedelta(microseconds=1)
    seconds, fraction = divmod(micros, 1_000_000)
    hours, rest = divmod(seconds, 3600)
    return f"{'-' if value < dt.timedelta(0) else ''}{hours:02d}:{rest // 60:02d}:{rest % 60:02d}.{fraction:06d}"


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(st.timedeltas(min_value=-dt.timedelta(hours=838, minutes=59, seconds=59),
                                     max_value=dt.timedelta(hours=838, minutes=59, seconds=59)),
                       min_size=1, max_size=30))
def test_any_duration_a_mariadb_time_holds_is_published_as_its_text(
    tmp_path_factory: pytest.TempPathFactory, mariadb_url: str, redis_url: str, redis_client: redis.Redis,
    stream_name: str, values: list[dt.timedelta],
) -> None:
    directory, stream = example_dir(tmp_path_factory, "times", stream_name)
    engine = create_engine(mariadb_url)
    with engine.begin() as conn:
        fresh_items(conn, "T TIME(6)")
        conn.execute(text("INSERT INTO ITEMS VALUES (:i, :t)"),
                     [{"i": i, "t": _mysql_time_text(v)} for i, v in enumerate(values, start=1)])
    engine.dispose()
    path = legacy_config(directory, mariadb_url, redis_url, stream, {"id": "integer", "t": "string"}, settle="off")
    try:
        result = run_once(path)
        assert result.errors == [] and result.rows_read == len(values)
        data = {e["event"]["data"]["id"]: e["event"]["data"]["t"] for e in read_stream(redis_client, stream)}
        assert data == {i: _mysql_time_text(v) for i, v in enumerate(values, start=1)}
    finally:
        redis_client.delete(stream)


@pytest.mark.parametrize("shape", ["table", "query"])
def test_a_mariadb_time_read_through_odbc_keeps_its_sign_and_its_hours(
    tmp_path: Path, mariadb_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str, shape: str
) -> None:
    """MariaDB's ODBC driver hands a TIME to pyodbc as a time of day: -00:00:01 arrives as 00:00:01 (the sign
    dropped, a wrong value) and 838:59:59 fails the fetch. Read as text, both are what is stored."""
    from tests.test_db_odbc import odbc_url

    url = odbc_url("mariadb", mariadb_url)
    engine = create_engine(mariadb_url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE ITEMS (ID INT PRIMARY KEY, TM TIME)"))
        conn.execute(text("INSERT INTO ITEMS VALUES (:i, :tm)"), [{"i": i, "tm": t} for i, t in enumerate(TIMES, 1)])
    engine.dispose()
    odbc = create_engine(url)
    with odbc.connect() as conn:
        assert conn.exec_driver_sql("SELECT TM FROM ITEMS WHERE ID = 1").scalar_one() == dt.time(0, 0, 1)  # the attack
    odbc.dispose()
    path = legacy_config(tmp_path, url, redis_url, stream_name, {"id": "integer", "tm": "string"},
                         **shaped(shape, "SELECT ID, TM FROM ITEMS"))
    result = run_once(path)
    assert result.errors == [] and result.rows_read == len(TIMES)
    assert dead_letters(tmp_path) == []
    data = {e["event"]["data"]["id"]: e["event"]["data"]["tm"] for e in read_stream(redis_client, stream_name)}
    assert data == dict(enumerate(TIMES, start=1))
