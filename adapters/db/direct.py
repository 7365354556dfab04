"""One kept statement run straight on psycopg's connection: the single statement of an idle poll.

At hundreds of polls a second, SQLAlchemy's execute costs more CPU than the round trip (the
statement's cache key, an execution context, a result object), and psycopg parses a statement's
`%(name)s` placeholders again at every execute once more than 128 distinct statements take turns
(the size of its cache): 300 sources do. Compiled once to `$n` placeholders, the statement runs on
a raw cursor (server-side binding, planned for its values at each run) and its row comes back as is.

Taken only where SQLAlchemy would change nothing (no parameter or column type with a converter, no
expanding parameter) and only outside a transaction (autocommit): a statement that fails there
leaves nothing aborted, so it is run once more through SQLAlchemy, which raises its error as it
always has and invalidates a connection that is gone.
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.sql.compiler import Compiled
from sqlalchemy.types import TypeEngine

# SQLAlchemy's pyformat placeholders; a literal % in the SQL is rendered doubled.
_PLACEHOLDER = re.compile(r"%%|%\((\w+)\)s")


_CURSOR = "straw.raw_cursor"  # conn.info: the raw cursor kept for the connection, with the connection it is on


class Direct:
    """`stmt` (a SQLAlchemy select returning one row), run straight where it can be."""

    def __init__(self, stmt: Any) -> None:
        self.stmt = stmt
        self._dialect: Dialect | None = None
        self._compiled: Compiled | None = None  # None: this statement goes through SQLAlchemy
        self._sql = ""
        self._pyformat = ""  # SQLAlchemy's own rendering, placeholders by name: what a batch numbers anew
        self._names: tuple[str, ...] = ()
        # Per placeholder: the keys the caller's parameters may give its value by, and its value otherwise
        # (None: a parameter that must be given, or one SQLAlchemy computes; `construct_params` decides).
        self._binds: tuple[tuple[str, str, Any], ...] | None = None

    def one(self, conn: Connection, params: dict[str, Any]) -> tuple[Any, ...]:
        if conn.dialect is not self._dialect:
            self._compile(conn.dialect)
        raw: Any = conn.connection.dbapi_connection
        if self._compiled is None or not getattr(raw, "autocommit", False):
            return tuple(conn.execute(self.stmt, params).one())
        import psycopg  # the psycopg driver is in use: importable

        try:
            cursor = self._cursor(conn, raw)
            # Never prepared: after five runs of a prepared statement PostgreSQL may settle on a generic
            # plan, blind to the watermark's value, and scan a big table for `ts >= $1` (idle_poll_ms on
            # 100,000 rows went from 8 to 24-66 ms). Unnamed, each run is planned for its values.
            cursor.execute(self._sql, self._values(params), prepare=False)
            rows = cursor.fetchall()
        except psycopg.Error:
            conn.info.pop(_CURSOR, None)
            return tuple(conn.execute(self.stmt, params).one())  # raised as SQLAlchemy raises it
        if len(rows) != 1:
            raise ValueError(f"expected one row, got {len(rows)}")  # a select of scalar subqueries: never
        return tuple(rows[0])

    @staticmethod
    def _cursor(conn: Connection, raw: Any) -> Any:
        """One raw cursor per connection, kept with it: a cursor per poll cost as much as its round trip."""
        kept = conn.info.get(_CURSOR)
        if kept is None or kept[0] is not raw:
            import psycopg

            kept = conn.info[_CURSOR] = (raw, psycopg.RawCursor(raw))
        return kept[1]

    def _values(self, params: dict[str, Any]) -> list[Any]:
        """The placeholders' values, in order: SQLAlchemy's `construct_params`, without its per-call walk."""
        binds = self._binds
        if binds is not None:
            values = []
            for key, name, value in binds:
                if key in params:
                    values.append(params[key])
                elif name in params:
                    values.append(params[name])
                elif value is _ASK:
                    break
                else:
                    values.append(value)
            else:
                return values
        assert self._compiled is not None
        constructed = self._compiled.construct_params(params, escape_names=False) or {}
        return [constructed[name] for name in self._names]

    def _compile(self, dialect: Dialect) -> None:
        self._dialect, self._compiled, self._binds = dialect, None, None
        if dialect.driver != "psycopg":
            return
        compiled = self.stmt.compile(dialect=dialect)
        if compiled.escaped_bind_names or compiled.literal_execute_params or compiled.post_compile_params:
            return
        if any(_converts_in(bind.type, dialect) for bind in compiled.binds.values()):
            return
        if any(_converts_out(col.type, dialect) for col in self.stmt.selected_columns):
            return
        names: list[str] = []

        def number(match: re.Match[str]) -> str:
            name = match.group(1)
            if name is None:
                return "%"
            if name not in names:
                names.append(name)
            return f"${names.index(name) + 1}"

        self._sql = _PLACEHOLDER.sub(number, compiled.string)
        self._pyformat = compiled.string
        self._names, self._compiled = tuple(names), compiled
        binds = [compiled.binds[name] for name in names]
        self._binds = tuple(
            (bind.key, name, _ASK if bind.required or bind.callable is not None else bind.value)
            for bind, name in zip(binds, names, strict=True)
        )


_ASK = object()  # a placeholder whose value only SQLAlchemy gives (or refuses): a missing required parameter


def batchable(direct: Direct, conn: Connection) -> bool:
    """Can `direct` (a select of one column) be run in a batch on `conn`: straight, on psycopg, in autocommit?"""
    if conn.dialect is not direct._dialect:
        direct._compile(conn.dialect)
    raw: Any = conn.connection.dbapi_connection
    return direct._compiled is not None and len(direct.stmt.selected_columns) == 1 and bool(
        getattr(raw, "autocommit", False))


class Batch:
    """Several one-value selects as the columns of one statement: one round trip, one parse, for all of them.

    Each select keeps its own placeholders, numbered anew in the batch from SQLAlchemy's own rendering
    (the same numbering `Direct` trusts); the statement is rebuilt only when its members change.
    """

    def __init__(self) -> None:
        self._kept: tuple[tuple[Direct, ...], str] = ((), "")  # the members and their statement, swapped whole

    def run(self, conn: Connection, members: list[tuple[Direct, dict[str, Any]]]) -> tuple[Any, ...] | None:
        """The value of each member's select, in order; None if the statement failed (nothing is aborted:
        autocommit; the caller asks each member alone instead)."""
        import psycopg  # the psycopg driver is in use: importable

        directs = tuple(direct for direct, _params in members)
        kept = self._kept  # read once: polls of the database on two connections may batch at once
        if kept[0] != directs:
            kept = self._kept = (directs, _compose(directs))
        values: list[Any] = []
        for direct, params in members:
            values.extend(direct._values(params))
        try:
            cursor = Direct._cursor(conn, conn.connection.dbapi_connection)
            cursor.execute(kept[1], values, prepare=False)  # unnamed, as `Direct.one`: planned for its values
            rows = cursor.fetchall()
        except psycopg.Error:
            conn.info.pop(_CURSOR, None)
            return None
        if len(rows) != 1 or len(rows[0]) != len(members):
            return None
        return tuple(rows[0])


def _compose(directs: tuple[Direct, ...]) -> str:
    count = 0
    parts: list[str] = []
    for direct in directs:
        numbers: dict[str, int] = {}

        def number(match: re.Match[str], numbers: dict[str, int] = numbers) -> str:
            nonlocal count
            name = match.group(1)
            if name is None:
                return "%"
            if name not in numbers:
                count += 1
                numbers[name] = count
            return f"${numbers[name]}"

        parts.append(f"({_PLACEHOLDER.sub(number, direct._pyformat)})")
        if tuple(numbers) != direct._names:  # the order `Direct._values` gives their values in: never otherwise
            raise AssertionError("placeholders numbered out of order")
    return "SELECT " + ", ".join(parts)


def _converts_in(kind: TypeEngine[Any], dialect: Dialect) -> bool:
    return kind.dialect_impl(dialect).bind_processor(dialect) is not None


def _converts_out(kind: TypeEngine[Any], dialect: Dialect) -> bool:
    try:
        return kind.dialect_impl(dialect).result_processor(dialect, None) is not None
    except Exception:  # a type that needs to know the column's type code: let SQLAlchemy convert it
        return True
