"""A configured `query` can never write to the legacy database: refused at load unless it is one read-only SELECT.

Each attack is tried on PostgreSQL, MariaDB and SQLite, natively and through their ODBC
drivers, with `check` and `preview` (both "write nothing") and with a source built in
code (no loader): every one is refused before it reaches the database, and the victim
table keeps its rows. Harmless semicolons (in comments, strings, at the end) still work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine

from adapters.db.engine import make_engine
from adapters.db.poller import DbSource, UnsafeQuery
from straw.config import DbSourceSpec
from straw.config_load import ConfigError, parse_config
from straw.sql_guard import refusal
from tests.test_cli import invoke

ATTACKS = [
    # The escape from the read-only session: close the probe's subquery, commit, write.
    "SELECT id, v FROM victim) q; COMMIT; BEGIN READ WRITE; DELETE FROM victim WHERE id = 3; COMMIT; "
    "SELECT * FROM (SELECT id, v FROM victim",
    "SET default_transaction_read_only = off; COMMIT; DELETE FROM victim WHERE id = 3",
    "SELECT id, v FROM victim; DELETE FROM victim WHERE id = 3",
    "SELECT id, v FROM victim /* ; */ ; DELETE FROM victim WHERE id = 3 -- ;",
    "DELETE FROM victim WHERE id = 3",
    "UPDATE victim SET v = 'x'",
    "WITH gone AS (DELETE FROM victim WHERE id = 3 RETURNING id, v) SELECT id, v FROM gone",
    "SELECT id, v FROM victim FOR UPDATE",
    "SELECT id, v FROM victim FOR SHARE",
    "SELECT id, v FROM victim LOCK IN SHARE MODE",
    "SELECT id, v INTO victim_copy FROM victim",
    "SELECT id, v FROM victim INTO OUTFILE '/tmp/straw_victim'",
    "SELECT id, v FROM victim /*! INTO OUTFILE '/tmp/straw_victim' */",
    "COPY victim TO STDOUT",
    "CALL delete_victim()",
    "DO $$ BEGIN DELETE FROM victim WHERE id = 3; END $$",
    "EXPLAIN ANALYZE DELETE FROM victim WHERE id = 3",
    "SELECT id, v, pg_terminate_backend(pg_backend_pid()) AS x FROM victim",
    "SELECT id, v, set_config('default_transaction_read_only', 'off', false) AS x FROM victim",
    "SELECT id, v, nextval('victim_seq') AS x FROM victim",
    "SELECT lo_unlink(1) AS id, 'x' AS v",
    "SELECT id, v, dblink_exec('dbname=x', 'DELETE FROM victim') AS x FROM victim",
    "SELECT id, v, load_extension('evil') AS x FROM victim",
]

HARMLESS = [
    "SELECT id, v FROM victim;",
    "SELECT id, v FROM victim WHERE v <> ';' -- a comment; with a semicolon",
    "SELECT id, v FROM victim /* ; DELETE FROM victim; */ WHERE v <> 'x; DELETE FROM victim'  ;  -- done",
    "WITH w AS (SELECT id, v FROM victim) SELECT id, v FROM w",
    "SELECT id, v FROM victim WHERE id < 100 UNION ALL SELECT id, v FROM victim WHERE id > 100",
]

VICTIM_ROWS = [(n, f"row {n}") for n in range(1, 6)]


def config_text(url: str, query: str) -> str:
    config = {
        "entities": {"victim": {"key": ["id"], "fields": {"id": "integer", "v": "string"}}},
        "sources": [{"name": "victims", "url": url, "query": query, "mode": "snapshot", "entity": "victim",
                     "stream": "t.victims"}],
    }
    return yaml.safe_dump(config, sort_keys=False, width=1000)


def query_line(text_: str) -> int:
    return next(n for n, line in enumerate(text_.splitlines(), 1) if line.lstrip().startswith("query:"))


def victim(url: str) -> Engine:
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS victim"))
        conn.execute(text("CREATE TABLE victim (id INTEGER PRIMARY KEY, v VARCHAR(40))"))
        conn.execute(text("INSERT INTO victim (id, v) VALUES (:id, :v)"), [{"id": i, "v": v} for i, v in VICTIM_ROWS])
    return engine


def victim_rows(engine: Engine) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text("SELECT id, v FROM victim ORDER BY id"))]


def odbc_url(db_url: str) -> str:
    from tests.test_db_odbc import odbc_url as odbc_of

    kind = create_engine(db_url).dialect.name
    return odbc_of("mariadb" if kind == "mysql" else kind, db_url)


@pytest.mark.parametrize("dialect_url", ["postgresql+psycopg://u@h/d", "mysql+pymysql://u@h/d", "sqlite:///x.db",
                                         "odbc:Driver={PostgreSQL Unicode};Server=h", "mssql+pyodbc://u@dsn"])
@pytest.mark.parametrize("attack", ATTACKS)
def test_every_attack_is_refused_at_load_with_its_line(dialect_url: str, attack: str) -> None:
    written = config_text(dialect_url, attack)
    with pytest.raises(ConfigError) as caught:
        parse_config(written, Path("straw.yaml"))
    [problem] = caught.value.problems
    assert problem.line == query_line(written) and problem.key == "sources[0].query", str(problem)
    assert problem.message.startswith("the query "), str(problem)
    assert "\n" not in str(problem)


@pytest.mark.parametrize("dialect_url", ["postgresql+psycopg://u@h/d", "mysql+pymysql://u@h/d", "sqlite:///x.db",
                                         "odbc:DSN=legacy"])
@pytest.mark.parametrize("query", HARMLESS)
def test_semicolons_in_comments_strings_and_at_the_end_are_allowed(dialect_url: str, query: str) -> None:
    parse_config(config_text(dialect_url, query), Path("straw.yaml"))


def test_the_reasons_say_what_to_change() -> None:
    assert "FOR UPDATE" in str(refusal("SELECT 1 FROM t FOR UPDATE", "postgres"))
    assert "INTO" in str(refusal("SELECT 1 INTO x FROM t", "postgres"))
    assert "2 statements" in str(refusal("SELECT 1; SELECT 2", "postgres"))
    assert "COPY" in str(refusal("COPY t TO STDOUT", "postgres"))
    assert "CALL" in str(refusal("CALL p()", "postgres"))
    assert "nextval()" in str(refusal("SELECT nextval('s')", "postgres"))
    assert refusal("SELECT a::int, $$;$$ FROM t WHERE b > :last_value", "postgres") is None


def _attack_everywhere(tmp_path: Path, url: str, engine: Engine) -> None:
    for attack in ATTACKS:
        path = tmp_path / "straw.yaml"
        path.write_text(config_text(url, attack))
        for args in (("check",), ("preview", "victims")):
            result = invoke(*args, "--config", str(path))
            assert result.exit_code == 2, (attack, result.output)
            assert "Traceback" not in result.output and "sources[0].query: the query" in result.output
        # A spec built in code skips the loader: the poller refuses the query itself before sending it.
        spec = DbSourceSpec.model_validate(
            {"name": "v", "url": url, "query": "SELECT id, v FROM victim", "mode": "snapshot", "entity": "victim",
             "stream": "t.v"}
        ).model_copy(update={"query": attack})
        source = DbSource(spec, ["id", "v"], make_engine(url), key_columns=["id"])
        try:
            with pytest.raises(UnsafeQuery, match="the query"):
                list(source.read(None))
            with pytest.raises(UnsafeQuery):
                source.check()
        finally:
            source.close()
        assert victim_rows(engine) == VICTIM_ROWS, attack


def test_no_attack_reaches_the_database(tmp_path: Path, db_url: str) -> None:
    engine = victim(db_url)
    try:
        _attack_everywhere(tmp_path, db_url, engine)
    finally:
        engine.dispose()


def test_no_attack_reaches_the_database_through_odbc(tmp_path: Path, db_url: str) -> None:
    engine = victim(db_url)
    try:
        _attack_everywhere(tmp_path, odbc_url(db_url), engine)
    finally:
        engine.dispose()


def test_harmless_semicolons_read_every_row(tmp_path: Path, db_url: str) -> None:
    engine = victim(db_url)
    try:
        for url in (db_url, odbc_url(db_url)):
            for query in HARMLESS:
                if "SQLite3" in url and "--" in query:
                    continue  # the SQLite ODBC driver refuses a `;` even in a comment: safe, documented
                path = tmp_path / "straw.yaml"
                path.write_text(config_text(url, query))
                result = invoke("preview", "victims", "--config", str(path))
                assert result.exit_code == 0, (url, query, result.output)
                assert all(f"row {n}" in result.output for n in range(1, 6)), (query, result.output)
        assert victim_rows(engine) == VICTIM_ROWS
    finally:
        engine.dispose()


def test_every_statement_around_a_query_is_sent_with_bound_parameters(tmp_path: Path, pg_url: str) -> None:
    """psycopg runs a parameterless string as several statements; with a parameter it refuses to."""
    engine = victim(pg_url)
    spec = parse_config(config_text(pg_url, "SELECT id, v FROM victim"), tmp_path / "straw.yaml").sources[0]
    assert isinstance(spec, DbSourceSpec)
    reader = make_engine(pg_url)
    sent: list[tuple[str, Any]] = []
    event.listen(reader, "before_cursor_execute", lambda _c, _cur, stmt, params, _x, _m: sent.append((stmt, params)))
    source = DbSource(spec, ["id", "v"], reader, key_columns=["id"])
    try:
        rows = [r for batch in source.read(None) for r in batch.rows]
        source.check()
    finally:
        source.close()
    assert [tuple(r) for r in rows] == VICTIM_ROWS
    with_query = [(s, p) for s, p in sent if "FROM victim" in s]
    assert len(with_query) >= 3  # the probe, the read, the check
    assert all(p for _s, p in with_query), with_query
    # What that buys: the same driver refuses a second statement once a parameter is bound.
    with reader.connect() as conn, pytest.raises(Exception, match="multiple commands"):
        conn.execute(text("SELECT 1 WHERE 1 = :one; DELETE FROM victim"), {"one": 1})
    reader.dispose()
    assert victim_rows(engine) == VICTIM_ROWS
    engine.dispose()


def test_a_mysql_url_may_not_allow_several_statements_per_string() -> None:
    written = config_text("mysql+pymysql://u@h/d?client_flag=65536", "SELECT id, v FROM victim")
    with pytest.raises(ConfigError, match="MULTI_STATEMENTS"):
        parse_config(written, Path("straw.yaml"))


def test_a_postgresql_session_over_odbc_is_read_only(pg_url: str) -> None:
    """psqlODBC runs a string of several statements even with parameters: the read-only session must hold there."""
    engine = victim(pg_url)
    reader = make_engine(odbc_url(pg_url))
    try:
        with reader.connect() as conn:
            assert conn.execute(text("SHOW transaction_read_only")).scalar() == "on"
            with pytest.raises(Exception, match="read-only transaction"):
                conn.execute(text("SELECT 1 WHERE 1 = :one; DELETE FROM victim WHERE id = 3"), {"one": 1})
        assert victim_rows(engine) == VICTIM_ROWS
    finally:
        reader.dispose()
        engine.dispose()
