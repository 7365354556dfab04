"""Engines for legacy databases: read-only sessions, pooled, pinged before use, time-limited statements."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from sqlalchemy import create_engine, event
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import DisconnectionError

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
    url: str,
    *,
    read_only: bool = True,
    statement_timeout: float | None = None,
    encoding: str = "utf-8",
    connections: int | None = None,
) -> Engine:
    """`url`: a SQLAlchemy URL, or `odbc:<ODBC connection string or DSN=name>` (see `odbc.py`).

    `encoding`: the source's text encoding, for databases that do not know their own
    (a PostgreSQL database created as SQL_ASCII). `connections`: the most connections
    ever open at once, one of them kept between uses, a surplus one closed when returned.
    """
    parsed = make_url(odbc.url_for(url) if url.startswith(odbc.PREFIX) else url)
    backend = parsed.get_backend_name()
    sqlite_file = _sqlite_file(parsed) if backend == "sqlite" and read_only else None
    if sqlite_file is not None:
        parsed = _sqlite_read_only(parsed, sqlite_file)
    options: dict[str, Any] = {"pool_pre_ping": True, "pool_size": 2} if backend != "sqlite" else {}
    if connections is not None and backend != "sqlite":
        # A shared pool is busy: pinging at every checkout would double an idle poll's round trips.
        options.update(pool_size=1, max_overflow=connections - 1, pool_pre_ping=False)
    engine = create_engine(parsed, **options)
    if sqlite_file is not None:
        _sqlite_must_exist(engine, sqlite_file)
    if connections is not None and backend != "sqlite":
        _ping_after_rest(engine)
    if connections is not None and parsed.get_driver_name() == "psycopg":
        _prepare_for_many(engine)
    _remember_session(engine, statement_timeout, encoding)
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

    if backend == "sqlite":
        _sqlite_deadline(engine)
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
    @event.listens_for(engine, "connect", insert=True)  # first: SQLAlchemy's own queries on it read text
    def _text(dbapi_connection: Any, _record: Any) -> None:
        _register_text(dbapi_connection, encoding)


def _register_text(dbapi_connection: Any, encoding: str) -> None:
    """The SQL_ASCII text loaders of `_sql_ascii_text` for `encoding` (nothing on any other database)."""
    from psycopg.adapt import Dumper, Loader  # the psycopg driver is in use: importable

    if dbapi_connection.info.parameter_status("server_encoding") != "SQL_ASCII":
        return

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

    for name in ("text", "varchar", "bpchar", "name", 0, 705):  # 0: no type; 705: unknown
        dbapi_connection.adapters.register_loader(name, LegacyText)
    dbapi_connection.adapters.register_dumper(str, LegacyStr)


_TIMEOUT, _ENCODING, _RETURNED = "straw.statement_timeout", "straw.encoding", "straw.returned"

# A connection unused for longer than this is pinged before a poll gets it (the server may have
# restarted, a firewall dropped it); one returned just now is not.
PING_AFTER = 2.0


# Statements a shared PostgreSQL connection keeps prepared: one per source on the database, at least.
PREPARED_MAX = 2000


def _prepare_for_many(engine: Engine) -> None:
    """psycopg prepares a statement after its 5th execution, but keeps only the last 100: with 300
    sources taking turns on one connection each statement was evicted before it ever got there."""

    @event.listens_for(engine, "connect")
    def _many(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.prepared_max = PREPARED_MAX


def _ping_after_rest(engine: Engine) -> None:
    """SQLAlchemy's pessimistic disconnect handling, only for connections that have rested."""

    @event.listens_for(engine, "checkin")
    def _returned(_dbapi_connection: Any, record: Any) -> None:
        if record is not None:
            record.info[_RETURNED] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        returned = record.info.get(_RETURNED)
        if returned is None or time.monotonic() - returned <= PING_AFTER:
            return  # new, or in use a moment ago
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:  # the pool drops this connection and hands out a fresh one
            raise DisconnectionError(str(exc)) from exc


def _remember_session(engine: Engine, statement_timeout: float | None, encoding: str) -> None:
    """Each new connection notes the settings it was opened with, so `session` changes only what differs."""

    @event.listens_for(engine, "connect")
    def _note(_dbapi_connection: Any, record: Any) -> None:
        record.info[_TIMEOUT] = statement_timeout
        record.info[_ENCODING] = encoding


def session(conn: Connection, statement_timeout: float | None, encoding: str) -> None:
    """Give a shared connection one source's statement timeout and text encoding.

    Sources on one database share its pool but may differ in these; a connection keeps
    what it was last given, so in the usual case (all alike) this is two dict look-ups.
    """
    info = conn.info
    if info.get(_ENCODING, encoding) != encoding:
        if conn.dialect.name == "postgresql" and conn.dialect.driver == "psycopg":
            _register_text(conn.connection.dbapi_connection, encoding)
        info[_ENCODING] = encoding
    if info.get(_TIMEOUT, statement_timeout) == statement_timeout:
        return
    backend = conn.dialect.name
    dbapi_connection = conn.connection.dbapi_connection
    if conn.dialect.driver == "pyodbc":
        dbapi_connection.timeout = max(1, round(statement_timeout)) if statement_timeout else 0  # type: ignore[union-attr]
    elif backend in ("postgresql", "mysql", "mariadb"):
        cursor = dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            for statement in _timeout_statements(backend, statement_timeout or 0.0):
                _execute_first(cursor, statement)
        finally:
            cursor.close()
        if backend == "postgresql":
            dbapi_connection.commit()  # type: ignore[union-attr]  # else the poll's rollback would undo the SET
    info[_TIMEOUT] = statement_timeout  # SQLite's deadline reads it from here at each statement


def _timeout_statements(backend: str, seconds: float) -> list[str]:
    """`seconds` 0: no limit."""
    millis = max(1, round(seconds * 1000)) if seconds else 0
    if backend == "postgresql":
        return [f"SET statement_timeout = {millis}"]
    if backend in ("mysql", "mariadb"):
        # MariaDB and MySQL name it differently; the first one the server knows wins.
        return [f"SET SESSION max_statement_time = {seconds:.3f}\n"
                f"SET SESSION max_execution_time = {millis}"]
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


def _sqlite_deadline(engine: Engine) -> None:
    """SQLite has no statement timeout: a progress handler interrupts a statement past its deadline."""

    @event.listens_for(engine, "before_cursor_execute")
    def _arm(conn: Any, _cursor: Any, _statement: Any, _params: Any, _context: Any, _many: Any) -> None:
        seconds = conn.info.get(_TIMEOUT)  # the connection's, as `session` last set it
        if not seconds:
            conn.connection.dbapi_connection.set_progress_handler(None, 10_000)
            return
        deadline = time.monotonic() + seconds
        # SQLite calls this every 10,000 virtual-machine steps; a true return interrupts the statement.
        conn.connection.dbapi_connection.set_progress_handler(lambda: time.monotonic() > deadline, 10_000)


def set_autocommit(conn: Connection, on: bool) -> None:
    """psycopg: `on`, each statement in a transaction of its own; off, transactions again (elsewhere nothing).

    On, for a poll's read-only probe: psycopg would send BEGIN before it and the pool ROLLBACK after,
    two round trips of three on an idle poll. Between polls the connection rests so, not idle in a
    transaction either, where other sources' settle probes would count it as a writer. Off for
    anything else (a page read streams from a cursor, which needs a transaction). A connection that
    cannot switch (broken, or left mid-transaction) is invalidated, never pooled as it is.
    """
    if conn.dialect.driver != "psycopg":
        return
    raw: Any = conn.connection.dbapi_connection
    if raw.autocommit is on:
        return
    try:
        raw.autocommit = on
    except Exception:
        conn.invalidate()
        raise
