"""Configuration of the DB modes: every mistake names its line and the fix."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from adapters.db.engine import make_engine
from fixtures.legacy_orders import create_orders
from straw.config_load import ConfigError, parse_config

HEAD = "entities: {o: {key: [a], fields: {a: integer}}}\nsources:\n"


def problems(sources: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(HEAD + sources, Path("straw.yaml"))
    return [str(p) for p in caught.value.problems]


def source(body: str, name: str = "s") -> str:
    lines = [f"name: {name}", "url: sqlite:///x.db", "entity: o", "stream: st", *body.strip().splitlines()]
    return "  - " + "\n    ".join(lines) + "\n"


def test_table_or_query_exactly_one() -> None:
    assert problems(source("mode: snapshot")) == [
        "straw.yaml:3: sources[0]: give exactly one of `table` (a table or view name) or `query` (a SELECT for joins)"
    ]
    both = problems(source("mode: snapshot\ntable: T\nquery: SELECT 1 AS a"))
    assert both[0].startswith("straw.yaml:9: sources[0].query: give exactly one of `table`")


def test_last_value_needs_start_value_and_no_snapshot() -> None:
    query = "query: SELECT * FROM T WHERE id > :last_value"
    assert problems(source(f"mode: incrementing\nincrementing_column: id\n{query}")) == [
        "straw.yaml:9: sources[0].query: `query` uses :last_value; set `start_value`, the value it takes before "
        "the first row (e.g. 0, or '1900-01-01 00:00:00')"
    ]
    assert "mode 'snapshot' reads the whole result" in problems(source(f"mode: snapshot\n{query}"))[0]
    # a PostgreSQL cast `x::last_value` is not the parameter
    parse_config(HEAD + source("mode: snapshot\nquery: SELECT a::last_value FROM T"), Path("straw.yaml"))


def test_settle_delay_soft_delete_and_encoding_are_checked() -> None:
    assert problems(source("mode: snapshot\ntable: T\nsettle_delay: 5s")) == [
        "straw.yaml:9: sources[0].settle_delay: `settle_delay` applies to modes 'timestamp' and 'incrementing' only"
    ]
    assert problems(source("mode: incrementing\nincrementing_column: a\ntable: T\nsettle: off\nsettle_delay: 5s")) == [
        "straw.yaml:10: sources[0].settle: `settle: off` takes rows at once; remove `settle_delay` or `settle: off`"
    ]
    assert problems(source("mode: snapshot\ntable: T\nsoft_delete: {column: X}")) == [
        "straw.yaml:9: sources[0].soft_delete.column: give exactly one of `value` (e.g. value: 'J') or "
        "`not_null: true`"
    ]
    assert problems(source("mode: snapshot\ntable: T\nencoding: cp9999")) == [
        "straw.yaml:9: sources[0].encoding: unknown encoding 'cp9999'; use a Python codec name such as 'cp1252' "
        "or 'latin-1'"
    ]


def test_a_snapshot_source_over_odbc_loads_as_written() -> None:
    text = HEAD + source("mode: snapshot\ntable: T\nsoft_delete: {column: GONE, not_null: true}\ntrim_char: true")
    config = parse_config(text.replace("url: sqlite:///x.db", 'url: "odbc:DSN=legacy;UID=straw"'), Path("straw.yaml"))
    spec = config.sources[0]
    assert spec.url == "odbc:DSN=legacy;UID=straw"  # an ODBC connection string is not a URL to rewrite
    assert spec.soft_delete is not None and spec.soft_delete.not_null and spec.trim_char


def test_a_legacy_sqlite_file_is_opened_read_only(tmp_path: Path) -> None:
    """`mode=ro`: SQLite refuses a write at the file level, even with `PRAGMA query_only` switched off."""
    legacy = tmp_path / "legacy #1.db"  # a space and '#' survive the file: URI
    with sqlite3.connect(legacy) as db:
        db.execute("CREATE TABLE T (a INTEGER)")
        db.execute("INSERT INTO T VALUES (1)")
    db.close()
    engine = make_engine(f"sqlite:///{legacy}")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT a FROM T")).all() == [(1,)]
        conn.execute(text("PRAGMA query_only = OFF"))
        with pytest.raises(OperationalError, match="readonly database"):
            conn.execute(text("INSERT INTO T VALUES (2)"))
    engine.dispose()


def test_a_mistyped_sqlite_path_is_an_error_naming_it_and_creates_nothing(tmp_path: Path, redis_url: str) -> None:
    from tests.helpers import orders_config
    from tests.test_cli import invoke, run_straw

    create_orders(create_engine(f"sqlite:///{tmp_path / 'legacy.db'}"), 3)
    path = orders_config(tmp_path, db_url="sqlite:///legasy.db", redis_url=redis_url, stream="t.typo")
    missing = tmp_path / "legasy.db"
    check = invoke("check", "--config", str(path))
    assert check.exit_code == 1
    assert f"FAIL source orders: FileNotFoundError: SQLite database {missing} not found; fix the path in `url`" in (
        check.stdout)
    preview = invoke("preview", "orders", "--config", str(path))
    assert preview.exit_code == 1 and str(missing) in preview.output and "Traceback" not in preview.output
    ran = run_straw("run", "--once", "--wait", "1", "--config", str(path))
    assert ran.returncode == 1 and f"SQLite database {missing} not found" in ran.stderr
    assert "Traceback" not in ran.stderr
    assert not missing.exists()


def test_change_columns_spelled_in_another_case_count_once(
    tmp_path: Path, db_url: str, redis_url: str, stream_name: str
) -> None:
    """Before: `table ORDERS: 11 columns` for the 9 columns mapped, and each selected twice."""
    from tests.helpers import orders_config, run_once
    from tests.test_cli import invoke

    engine = create_engine(db_url)
    create_orders(engine, 4)
    engine.dispose()
    path = orders_config(tmp_path, db_url=db_url, redis_url=redis_url, stream=stream_name, mode="timestamp",
                         timestamp_column="changed_at", key_column="order_no")
    check = invoke("check", "--config", str(path))
    assert "table ORDERS: 9 columns, mode timestamp" in check.stdout, check.output
    result = run_once(path)
    assert result.errors == [] and result.rows_read == 4
