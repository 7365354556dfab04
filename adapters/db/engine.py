"""Engines for legacy databases: read-only sessions, pooled, pinged before use, time-limited statements."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from sqlalchemy import create_engine, event
from sqlalchemy.engine import URL, Engine, make_url

from adapters.db import odbc

_SQL_ATTR_ACCESS_MODE = 101
_SQL_MODE_READ_ONLY = 1

# The statement each dialect understands for "this session never writes".
_READ_ONLY = {
    "postgresql": "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
    "mysql": "SET SESSION TRANSACTION READ ONLY",
    "mariadb": "SET SESSION TRANSACTION READ ONLY",
    "sqlite": "PRAGMA query_only = ON",
}


def make_engine(
    url: str, *, read_only: bool = True, statement_timeout: float | None = None, encoding: str = "utf-8"
) -> Engine:
    """`url`: a SQLAlchemy URL, or `odbc:<ODBC connection string or DSN=name>` (see `odbc.py`).

    `encoding`: the source's text encoding, for databases that do not know their own
    (a PostgreSQL database created as SQL_ASCII).
    """
    parsed = make_url(odbc.url_for(url) if url.startswith(odbc.PREFIX) else url)
    backend = parsed.get_backend_name()
    sqlite_file = _sqlite_file(parsed) if backend == "sqlite" and read_only else None
    if sqlite_file is not None:
        parsed = _sqlite_read_only(parsed, sqlite_file)
    options: dict[str, Any] = {"pool_pre_ping": True, "pool_size": 2} if backend != "sqlite" else {}
    engine = create_engine(parsed, **options)
    if sqlite_file is not None:
        _sqlite_must_exist(engine, sqlite_file)
    if backend == "postgresql" and parsed.get_driver_name() == "psycopg":
        _sql_ascii_text(engine, encoding)
    # Over straw's generic `odbc:` dialect the DBMS shows only in the driver's name; psqlODBC runs several
    # statements from one string, so there the read-only session matters most.
    session = "postgresql" if url.startswith(odbc.PREFIX) and "postgres" in url.lower() else backend
    statements = [_READ_ONLY[session]] if read_only and session in _READ_ONLY else []
    if statement_timeout:
        statements += _timeout_statements(backend, statement_timeout)
    if statements:

        @event.listens_for(engine, "connect")
        def _session(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            try:
                for statement in statements:
                    _execute_first(cursor, statement)
            finally:
                cursor.close()
            if session == "postgresql":
                # SET outside a transaction block must be committed under psycopg's implicit transactions.
                dbapi_connection.commit()

    if statement_timeout and backend == "sqlite":
        _sqlite_deadline(engine, statement_timeout)
    if parsed.get_driver_name() == "pyodbc":

        @event.listens_for(engine, "connect")
        def _odbc_session(dbapi_connection: Any, _record: Any) -> None:
            if read_only:
                # SQL_ATTR_ACCESS_MODE = SQL_MODE_READ_ONLY: a hint that drivers may ignore; refused, never an error
                with contextlib.suppress(Exception):
                    dbapi_connection.set_attr(_SQL_ATTR_ACCESS_MODE, _SQL_MODE_READ_ONLY)
            if statement_timeout:
                # pyodbc's query timeout, in whole seconds (SQL_ATTR_QUERY_TIMEOUT): the one every driver knows.
                dbapi_connection.timeout = max(1, round(statement_timeout))

    return engine


def _sqlite_file(url: URL) -> str | None:
    """The file a SQLite URL opens (a `file:` URI's path part), or None for an in-memory database."""
    database = url.database or ""
    if database in ("", ":memory:") or "mode=memory" in database:
        return None
    if database.startswith("file:"):
        return unquote(database[5:].split("?", 1)[0]) or None
    return database


def _sqlite_read_only(url: URL, path: str) -> URL:
    """Open the legacy file with `mode=ro`: SQLite then never creates it (a typo makes no empty `typo.db`)
    and refuses every write at the file level, below `PRAGMA query_only`."""
    database = url.database or ""
    uri = database if database.startswith("file:") else "file:" + quote(path)
    return url.set(database=uri, query={**url.query, "mode": "ro", "uri": "true"})


def _sqlite_must_exist(engine: Engine, path: str) -> None:
    @event.listens_for(engine, "do_connect")
    def _exists(_dialect: Any, _record: Any, _cargs: Any, _cparams: Any) -> None:
        # SQLite's own "unable to open database file" does not say which file.
        if not Path(path).is_file():
            raise FileNotFoundError(f"SQLite database {path} not found; fix the path in `url`")


def _sql_ascii_text(engine: Engine, encoding: str) -> None:
    """Text from a SQL_ASCII PostgreSQL database, decoded as the source says.

    Such a database stores whatever bytes its clients sent, so no client encoding is
    right for every row, and psycopg hands back bytes, on which SQLAlchemy's own first
    queries fail. Text is decoded with the source's `encoding`; a value that is not
    valid in it stays bytes, so the mapping reports it (a dead letter naming the
    offset) instead of failing the batch.
    """
    from psycopg.adapt import Dumper, Loader  # the psycopg driver is in use: importable

    class LegacyText(Loader):
        def load(self, data: Any) -> str | bytes:
            raw = bytes(data)
            try:
                return raw.decode(encoding)
            except UnicodeDecodeError:
                return raw

    class LegacyStr(Dumper):  # parameters (query params, positions) go out in the same encoding
        def dump(self, obj: str) -> bytes:
            return obj.encode(encoding)

    @event.listens_for(engine, "connect", insert=True)  # first: SQLAlchemy's own queries on it read text
    def _text(dbapi_connection: Any, _record: Any) -> None:
        if dbapi_connection.info.parameter_status("server_encoding") == "SQL_ASCII":
            for name in ("text", "varchar", "bpchar", "name", 0, 705):  # 0: no type; 705: unknown
                dbapi_connection.adapters.register_loader(name, LegacyText)
            dbapi_connection.adapters.register_dumper(str, LegacyStr)


def _timeout_statements(backend: str, seconds: float) -> list[str]:
    if backend == "postgresql":
        return [f"SET statement_timeout = {max(1, round(seconds * 1000))}"]
    if backend in ("mysql", "mariadb"):
        # MariaDB and MySQL name it differently; the first one the server knows wins.
        return [f"SET SESSION max_statement_time = {seconds:.3f}\n"
                f"SET SESSION max_execution_time = {max(1, round(seconds * 1000))}"]
    return []


def _execute_first(cursor: Any, alternatives: str) -> None:
    """Run the first of the newline-separated statements that the server accepts."""
    options = alternatives.split("\n")
    for option in options[:-1]:
        try:
            cursor.execute(option)
            return
        except Exception:  # the server's own error class: the next alternative decides
            continue
    cursor.execute(options[-1])


def _sqlite_deadline(engine: Engine, seconds: float) -> None:
    """SQLite has no statement timeout: a progress handler interrupts a statement past its deadline."""

    @event.listens_for(engine, "before_cursor_execute")
    def _arm(conn: Any, _cursor: Any, _statement: Any, _params: Any, _context: Any, _many: Any) -> None:
        deadline = time.monotonic() + seconds
        # SQLite calls this every 10,000 virtual-machine steps; a true return interrupts the statement.
        conn.connection.dbapi_connection.set_progress_handler(lambda: time.monotonic() > deadline, 10_000)
