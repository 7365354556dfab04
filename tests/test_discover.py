"""`straw discover`: from a database URL to a draft that `straw check` accepts and `run --once` publishes whole.

Each database gets the same legacy schema (fixtures/legacy_shapes.py: a growing id, a
CHANGED_AT without an index, a composite key, no key at all, NUMERIC money, CHAR padding,
a byte column, a view); the draft is written, checked and run as written, and every row
of every table must arrive in its stream.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import create_engine

from fixtures.legacy_shapes import EXPECTED_MODES, ROWS, create_shapes
from straw.draft import _scalar
from tests.helpers import read_stream, run_once
from tests.test_cli import invoke


def _draft(tmp_path: Path, url: str, stream_name: str, redis_url: str, *extra: str) -> dict[str, Any]:
    path = tmp_path / "straw.yaml"
    result = invoke("discover", url, "--write", str(path), "--stream-prefix", f"{stream_name}.", *extra,
                    env={"REDIS_URL": redis_url})
    assert result.exit_code == 0, result.output
    draft: dict[str, Any] = yaml.safe_load(path.read_text())
    return draft


def _publishes_every_row(tmp_path: Path, redis_url: str, client: redis.Redis, stream_name: str,
                         monkeypatch: pytest.MonkeyPatch) -> dict[str, list[dict[str, Any]]]:
    monkeypatch.setenv("REDIS_URL", redis_url)
    path = tmp_path / "straw.yaml"
    checked = invoke("check", "-c", str(path), env={"REDIS_URL": redis_url})
    assert checked.exit_code == 0, checked.output
    result = run_once(path)
    assert result.errors == []
    events = {table: [e["event"] for e in read_stream(client, f"{stream_name}.{table.lower()}")] for table in ROWS}
    assert {t: len(e) for t, e in events.items()} == ROWS  # every row of every table, once
    assert all(e["type"].endswith(".upserted") for evs in events.values() for e in evs)
    return events


def _check_draft(draft: dict[str, Any]) -> None:
    sources = {s["table"]: s for s in draft["sources"]}
    assert {t: s["mode"] for t, s in sources.items()} == EXPECTED_MODES
    assert sources["INVOICES"]["incrementing_column"] == "INVOICE_ID"
    assert sources["CUSTOMERS"]["timestamp_column"] == "CHANGED_AT"
    assert sources["CUSTOMERS"]["key_column"] == "CUST_NO"
    assert sources["CUSTOMERS"]["trim_char"] is True
    assert sources["INVOICES"]["deletes"] == {"sweep_interval": "1h"}  # the key sweep, where it applies
    assert "deletes" not in sources["ORDER_LINES"]
    entities = draft["entities"]
    assert entities["invoices"]["fields"]["amount"] == {"type": "decimal", "scale": 2}
    assert entities["invoices"]["fields"]["issued"] == "date"
    assert entities["customers"]["fields"]["changed_at"] == "datetime"
    assert entities["order_lines"]["key"] == ["order_no", "line_no"]
    assert entities["order_lines"]["fields"]["qty"] == {"type": "decimal", "scale": 3}
    assert entities["audit_log"]["key"] == ["logged", "user_name", "action"]  # no key: the NOT NULL columns
    assert entities["documents"]["fields"]["body"] == "bytes"


@pytest.mark.parametrize("via", ["native", "odbc"])
def test_discover_drafts_a_config_that_runs_and_publishes_every_row(
    tmp_path: Path, db_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str,
    monkeypatch: pytest.MonkeyPatch, via: str,
) -> None:
    engine = create_engine(db_url)
    create_shapes(engine)
    url = db_url
    if via == "odbc":  # the same database through its ODBC driver (skipped where the driver is missing)
        from tests.test_db_odbc import odbc_url

        url = odbc_url(engine.dialect.name if engine.dialect.name != "mysql" else "mariadb", db_url)
    engine.dispose()
    draft = _draft(tmp_path, url, stream_name, redis_url)
    _check_draft(draft)
    assert {s["url"] for s in draft["sources"]} == {url}
    text = (tmp_path / "straw.yaml").read_text()
    assert "NOT indexed" in text  # CUSTOMERS.CHANGED_AT has no index: the draft says what that costs
    assert "MODIFIED looks like a change time but holds NULLs" in text
    assert "view V_OPEN_INVOICES" in text  # listed, not drafted
    events = _publishes_every_row(tmp_path, redis_url, redis_client, stream_name, monkeypatch)
    invoice = events["INVOICES"][0]["data"]
    assert invoice["amount"] == "101.01" and invoice["issued"] == "2026-11-01"
    assert {e["data"]["country"] for e in events["CUSTOMERS"]} == {"DE"}  # CHAR(5) padding trimmed
    assert events["ORDER_LINES"][0]["subject"] == "1/1" and events["ORDER_LINES"][0]["data"]["qty"] == "0.125"


def test_tables_narrows_and_may_name_a_view(tmp_path: Path, sqlite_url: str, redis_url: str, stream_name: str) -> None:
    create_shapes(create_engine(sqlite_url))
    draft = _draft(tmp_path, sqlite_url, stream_name, redis_url, "--tables", "invoices, V_OPEN_INVOICES")
    assert [s["table"] for s in draft["sources"]] == ["INVOICES", "V_OPEN_INVOICES"]
    view = draft["sources"][1]
    assert view["mode"] == "snapshot"  # a view has no key the catalog shows: listed whole
    assert draft["entities"]["v_open_invoices"]["key"] == ["invoice_id", "amount"]


def test_an_unknown_table_is_one_line_naming_the_tables_there(tmp_path: Path, sqlite_url: str) -> None:
    create_shapes(create_engine(sqlite_url))
    result = invoke("discover", sqlite_url, "--tables", "INVOICE")
    assert result.exit_code == 2
    assert "no table or view invoice" in result.output and "INVOICES" in result.output
    assert "Traceback" not in result.output


def test_discover_writes_nothing_to_the_legacy_database_nor_over_a_file(tmp_path: Path, sqlite_url: str) -> None:
    create_shapes(create_engine(sqlite_url))
    legacy = Path(sqlite_url.removeprefix("sqlite:///"))
    before = hashlib.sha256(legacy.read_bytes()).hexdigest()
    target = tmp_path / "mine.yaml"
    target.write_text("edited by hand\n")
    result = invoke("discover", sqlite_url, "--write", str(target))
    assert result.exit_code == 1 and "exists" in result.output
    assert target.read_text() == "edited by hand\n"
    assert hashlib.sha256(legacy.read_bytes()).hexdigest() == before
    assert invoke("discover", sqlite_url).exit_code == 0  # stdout instead
    assert hashlib.sha256(legacy.read_bytes()).hexdigest() == before


def test_a_password_on_the_command_line_never_reaches_the_draft_or_the_screen(
    tmp_path: Path, pg_url: str, redis_url: str, stream_name: str
) -> None:
    from sqlalchemy.engine import make_url

    create_shapes(create_engine(pg_url))
    url = make_url(pg_url).set(password="Sup3r-secret").render_as_string(hide_password=False)  # trust: ignored
    draft = _draft(tmp_path, url, stream_name, redis_url, "--tables", "INVOICES")
    text = (tmp_path / "straw.yaml").read_text()
    assert "Sup3r-secret" not in text
    assert draft["sources"][0]["url"] == make_url(url).set(password="X").render_as_string(
        hide_password=False).replace(":X@", ":${STRAW_DB_PASSWORD}@")
    assert "export STRAW_DB_PASSWORD" in text
    shown = invoke("discover", url, "--tables", "INVOICES")
    assert shown.exit_code == 0 and "Sup3r-secret" not in shown.output


def test_a_url_with_a_variable_keeps_the_variable_in_the_draft(
    tmp_path: Path, sqlite_url: str, redis_url: str, stream_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    create_shapes(create_engine(sqlite_url))
    monkeypatch.setenv("LEGACY_DB", sqlite_url.removeprefix("sqlite:///"))
    draft = _draft(tmp_path, "sqlite:///${LEGACY_DB}", stream_name, redis_url, "--tables", "INVOICES")
    assert draft["sources"][0]["url"] == "sqlite:///${LEGACY_DB}"


@pytest.mark.parametrize("url, expected", [
    ("postgresql+psycopg://postgres@127.0.0.1:1/none", "cannot read the database"),  # nothing listens
    ("sqlite:///no/such/file.db", "not found"),
    ("127.0.0.1:5432/erp", "cannot read the database"),  # no scheme
])
def test_a_database_that_cannot_be_read_is_one_line(url: str, expected: str) -> None:
    result = invoke("discover", url)
    assert result.exit_code in (1, 2)
    assert expected in result.output and "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1


def test_hostile_table_and_column_names_still_draft_a_running_config(
    tmp_path: Path, sqlite_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = create_engine(sqlite_url)
    with engine.begin() as conn:
        conn.exec_driver_sql('CREATE TABLE "yes" ("no" INTEGER PRIMARY KEY, "null" TEXT, "# x: y" TEXT, '
                             '"Größe €" NUMERIC(8,2), "- a" TEXT, "NULL " TEXT, "x\ny: 1" CHAR(2))')
        conn.exec_driver_sql("""INSERT INTO "yes" VALUES (1, 'a', 'b', 1.5, 'c', 'd', 'f'), """
                             """(2, NULL, NULL, 2, NULL, 'e', 'g')""")
    engine.dispose()
    draft = _draft(tmp_path, sqlite_url, stream_name, redis_url)
    assert draft["sources"][0]["table"] == "yes" and draft["sources"][0]["name"] == "yes"
    monkeypatch.setenv("REDIS_URL", redis_url)
    assert run_once(tmp_path / "straw.yaml").errors == []
    events = [e["event"] for e in read_stream(redis_client, f"{stream_name}.yes")]
    assert [e["subject"] for e in events] == ["1", "2"]
    assert events[0]["data"] == {"no": 1, "null": "a", "x_y": "b", "größe": "1.50", "a": "c", "null_2": "d",
                                "x_y_1": "f"}


@given(st.text())
def test_every_value_the_draft_writes_reads_back_as_itself(value: str) -> None:
    assert yaml.safe_load(f"key: {_scalar(value)}  # comment") == {"key": value}


def test_id_gaps_where_settle_must_wait_for_them_are_noted(tmp_path: Path, sqlite_url: str) -> None:
    from tests.test_db_odbc import odbc_url

    engine = create_engine(sqlite_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE T (ID INTEGER PRIMARY KEY, V TEXT)")
        conn.exec_driver_sql("INSERT INTO T VALUES (1, 'a'), (5, 'b'), (9, 'c')")
    engine.dispose()
    native = invoke("discover", sqlite_url)
    assert native.exit_code == 0 and "mode: incrementing" in native.output and "missing" not in native.output
    through_odbc = invoke("discover", odbc_url("sqlite", sqlite_url))
    assert through_odbc.exit_code == 0 and "mode: incrementing" in through_odbc.output
    assert "6 ids are missing between 1 and 9" in through_odbc.output


def test_postgresql_schema_estimates_and_a_type_straw_does_not_map(
    tmp_path: Path, pg_url: str, redis_url: str, stream_name: str
) -> None:
    engine = create_engine(pg_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE SCHEMA sales")
        conn.exec_driver_sql("CREATE TABLE sales.big (id bigint PRIMARY KEY, ref uuid NOT NULL DEFAULT "
                             "gen_random_uuid(), price numeric(9,4), changed_at timestamptz NOT NULL DEFAULT now(), "
                             "tags text[])")
        conn.exec_driver_sql("CREATE INDEX ON sales.big (changed_at)")
        conn.exec_driver_sql("INSERT INTO sales.big (id, price) SELECT g, g / 7.0 FROM generate_series(1, 120000) g")
        conn.exec_driver_sql("ANALYZE sales.big")
        conn.exec_driver_sql("CREATE TABLE public.other (id int PRIMARY KEY)")
    engine.dispose()
    draft = _draft(tmp_path, pg_url, stream_name, redis_url, "--schema", "sales")
    assert [s["table"] for s in draft["sources"]] == ["big"]  # public.other is another schema
    source = draft["sources"][0]
    assert source["schema"] == "sales" and source["mode"] == "timestamp" and source["key_column"] == "id"
    assert draft["entities"]["big"]["fields"] == {"id": "integer", "ref": "string",
                                                  "price": {"type": "decimal", "scale": 4}, "changed_at": "datetime"}
    text = (tmp_path / "straw.yaml").read_text().replace("\n    #   ", " ")  # long reasons wrap
    assert "# tags: left out, TEXT[] is not a type straw maps" in text
    assert "about 120,000 rows" in text or "about 119," in text or "about 120," in text  # pg_class.reltuples
    assert "changed_at is a TIMESTAMP WITH TIME ZONE named like a change time, indexed" in text
    assert invoke("check", "-c", str(tmp_path / "straw.yaml"), env={"REDIS_URL": redis_url}).exit_code == 0


LEGACY_COLUMNS = {  # per database: columns whose driver value is not the stored one, and what is published
    "postgresql": (
        "iv interval, ip inet, net cidr, ref uuid, price money",
        "'1 mon 2 days', '10.0.0.1', '10.0.0.0/8', '5f0c6e2a-9b1d-4c3e-8f7a-1b2c3d4e5f60', 12.5",
        {"iv": "string", "ip": "string", "net": "string", "ref": "string", "price": "decimal"},
        {"iv": "1 mon 2 days", "ip": "10.0.0.1", "net": "10.0.0.0/8", "ref": "5f0c6e2a-9b1d-4c3e-8f7a-1b2c3d4e5f60",
         "price": "12.50"},
    ),
    "mariadb": (
        "tm TIME, s SET('x','y'), flag BIT(1), bits BIT(12), y YEAR, ref UUID",
        "'-01:02:03', 'y,x', 1, 4095, 1999, '5f0c6e2a-9b1d-4c3e-8f7a-1b2c3d4e5f60'",
        {"tm": "string", "s": "string", "flag": "boolean", "bits": "integer", "y": "integer", "ref": "string"},
        {"tm": "-01:02:03", "s": "x,y", "flag": True, "bits": 4095, "y": 1999,
         "ref": "5f0c6e2a-9b1d-4c3e-8f7a-1b2c3d4e5f60"},
    ),
}


@pytest.mark.parametrize("database", ["postgresql", "mariadb"])
def test_types_whose_driver_value_is_not_the_stored_one_are_drafted_and_published_as_stored(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, stream_name: str, database: str,
    request: pytest.FixtureRequest,
) -> None:
    """A draft that left these out, or kept them and made every row a dead letter (a MariaDB SET came as a
    Python set), or published a MariaDB TIME modulo 24 h, would make a poor first run."""
    url = str(request.getfixturevalue("pg_url" if database == "postgresql" else "mariadb_url"))
    columns, values, fields, published = LEGACY_COLUMNS[database]
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE TABLE legacy (id int PRIMARY KEY, {columns})")
        conn.exec_driver_sql(f"INSERT INTO legacy VALUES (1, {values})")
    engine.dispose()
    draft = _draft(tmp_path, url, stream_name, redis_url)
    assert draft["entities"]["legacy"]["fields"] == {"id": "integer", **fields}
    assert invoke("check", "-c", str(tmp_path / "straw.yaml"), env={"REDIS_URL": redis_url}).exit_code == 0
    result = run_once(tmp_path / "straw.yaml")
    assert result.errors == []
    [event] = [e["event"] for e in read_stream(redis_client, f"{stream_name}.legacy")]
    assert event["data"] == {"id": 1, **published}


def test_mariadb_row_counts_come_from_information_schema(tmp_path: Path, mariadb_url: str) -> None:
    engine = create_engine(mariadb_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE big (id int PRIMARY KEY, v varchar(10))")
        conn.exec_driver_sql("INSERT INTO big SELECT seq, 'x' FROM seq_1_to_120000")
        conn.exec_driver_sql("ANALYZE TABLE big")
        estimate = conn.exec_driver_sql("SELECT TABLE_ROWS FROM information_schema.TABLES WHERE TABLE_NAME = 'big' "
                                        "AND TABLE_SCHEMA = DATABASE()").scalar_one()
    engine.dispose()
    result = invoke("discover", mariadb_url)
    assert result.exit_code == 0
    assert f"~{estimate:,}" in result.output  # the kept estimate, marked as one
    assert f"about {estimate:,} rows" in result.stdout


def test_a_refused_login_is_one_line_without_the_password(mariadb_url: str) -> None:
    from sqlalchemy.engine import make_url

    url = make_url(mariadb_url).set(username="no_such_straw_user", password="Pw-secret-123")
    result = invoke("discover", url.render_as_string(hide_password=False))
    assert result.exit_code == 1
    assert "cannot read the database" in result.output and "Access denied" in result.output
    assert "Pw-secret-123" not in result.output and "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1
