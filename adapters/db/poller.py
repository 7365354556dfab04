"""Poll one legacy table, view or query for rows after a stored position.

Modes: `incrementing` (a growing column), `timestamp` (change time plus a unique
tie-breaker, optionally only rows older than the database's now minus a settle
delay) and `snapshot` (the whole relation ordered by the entity key, each batch
marked keyed: the outbox keeps per-key hashes and turns the listing into changes).

The watermark is always a bound parameter; rows stream from a server-side
cursor in `batch_size` partitions, so memory stays flat whatever the backlog.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator, Sequence
from typing import Any, overload

from sqlalchemy import (
    ColumnElement,
    DateTime,
    FromClause,
    MetaData,
    Select,
    Table,
    and_,
    bindparam,
    column,
    literal,
    or_,
    select,
    text,
    tuple_,
    type_coerce,
)
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.exc import DBAPIError, NoSuchTableError
from sqlalchemy.types import NullType, TypeDecorator, TypeEngine

from adapters.db import position
from adapters.db.engine import make_engine
from straw import sql_guard
from straw.coerce import boolean
from straw.config import ChangeMode, DbSourceSpec, SoftDeleteSpec
from straw.records import DELETED, UPSERTED
from straw.source import RawBatch


class SchemaDrift(Exception):
    """The legacy table no longer has what the configuration names."""


class UnsafeQuery(ValueError):
    """The configured query is not one read-only SELECT: it is never sent."""


# The database's own clock, in UTC: a settle delay must not depend on this host's clock.
_UTC_NOW = {
    "postgresql": "SELECT now()",
    "mysql": "SELECT UTC_TIMESTAMP(6)",
    "mariadb": "SELECT UTC_TIMESTAMP(6)",
    "sqlite": "SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')",
    "mssql": "SELECT SYSUTCDATETIME()",
    "oracle": "SELECT SYS_EXTRACT_UTC(SYSTIMESTAMP) FROM DUAL",
}


class DbSource:
    def __init__(
        self,
        spec: DbSourceSpec,
        columns: list[str],
        engine: Engine | None = None,
        *,
        key_columns: Sequence[str] = (),
    ) -> None:
        """`columns`: the source columns the mapping needs; change columns are added here.

        `key_columns`: the entity key's columns (snapshot mode orders and resumes by them).
        """
        self.name = spec.name
        self.spec = spec
        self.engine = engine or make_engine(spec.url, statement_timeout=spec.statement_timeout, encoding=spec.encoding)
        self._keys = list(key_columns)
        soft = [spec.soft_delete.column] if spec.soft_delete else []
        self._wanted = list(dict.fromkeys([*columns, *self._change_columns(), *soft]))
        self._from: FromClause | None = None
        self._names: list[str] = []  # the wanted columns as the relation spells them, each once
        self._spelled: dict[str, str] = {}  # wanted name -> the relation's spelling
        self._types: tuple[type | None, ...] = ()  # python types of the change columns (None: as stored)
        self._aware: bool | None = False  # the timestamp column keeps a time zone (None: not known yet)
        self._is_deleted = _soft_delete_rule(spec.soft_delete, spec.encoding) if spec.soft_delete else None

    def _change_columns(self) -> list[str]:
        if self.spec.mode is ChangeMode.INCREMENTING:
            return [str(self.spec.incrementing_column)]
        if self.spec.mode is ChangeMode.TIMESTAMP:
            return [str(self.spec.timestamp_column), str(self.spec.key_column)]
        if not self._keys:
            raise ValueError(f"source {self.name!r}: mode 'snapshot' needs the entity's key columns")
        return self._keys

    # --- the relation: a reflected table, or the configured query as a subquery ---

    def relation(self) -> FromClause:
        if self._from is None:
            self._from = self._reflect() if self.spec.table is not None else self._probe()
        return self._from

    def _reflect(self) -> FromClause:
        name = str(self.spec.table)
        try:
            table = Table(name, MetaData(), schema=self.spec.db_schema, autoload_with=self.engine)
        except NoSuchTableError:
            raise SchemaDrift(
                f"source {self.name!r}: table {name!r} not found; check `table` (and `schema`)"
            ) from None
        self._names = self._resolve([c.name for c in table.columns], f"table {name!r}")
        change = [table.c[c] for c in self._resolved(self._change_columns())]
        self._types = tuple(_python_type(c.type) for c in change)
        self._aware = bool(getattr(change[0].type, "timezone", False))
        return table

    def _probe(self) -> FromClause:
        """Ask the database which columns the query returns (no rows are read).

        The query is checked again here (the configuration is checked at load, but a spec can be built in
        code), and every statement around it carries a bound parameter: drivers that would run a string of
        several statements (psycopg without parameters) then use server-side binding, which refuses them.
        """
        dialect = sql_guard.dialect_for(self.spec.url)
        reason = sql_guard.refusal(str(self.spec.query), dialect)
        if reason:
            raise UnsafeQuery(f"source {self.name!r}: the query {reason}")
        # New lines around it: a trailing `-- comment` in the query must not swallow the closing parenthesis.
        guarded = f"SELECT * FROM (\n{sql_guard.sendable(str(self.spec.query), dialect)}\n) q0 WHERE 1 = :straw_one"
        relation = text(guarded).bindparams(straw_one=1)
        with self.engine.connect() as conn:
            probe = select(text("*")).select_from(relation.columns().subquery("q")).where(text("1 = 0"))
            result = conn.execute(probe, self._query_params(None))
            returned = list(result.keys())
            result.close()
        self._names = self._resolve(returned, "`query`")
        self._types = tuple(None for _ in self._change_columns())
        self._aware = None  # a query's column types show only in the values it returns
        return relation.columns(*(column(c) for c in returned)).subquery("q")

    def _resolve(self, available: list[str], what: str) -> list[str]:
        by_lower = {c.lower(): c for c in available}
        missing = [c for c in self._wanted if c not in available and c.lower() not in by_lower]
        if missing:
            raise SchemaDrift(
                f"source {self.name!r}: {what} has no column {', '.join(repr(m) for m in missing)} "
                f"(it has: {', '.join(available)}); fix `mapping`, the change or soft-delete columns in the "
                "configuration, or the legacy schema"
            )
        # Each wanted name as the relation spells it; `order_no` and `ORDER_NO` are one column, selected once.
        self._spelled = {c: c if c in available else by_lower[c.lower()] for c in self._wanted}
        return list(dict.fromkeys(self._spelled.values()))

    def _resolved(self, wanted: list[str]) -> list[str]:
        return [self._spelled[c] for c in wanted]

    def _query_params(self, last_value: Any) -> dict[str, Any]:
        params: dict[str, Any] = dict(self.spec.params)
        if self.spec.uses_last_value:
            params["last_value"] = self.spec.start_value if last_value is None else last_value
        return params

    # --- the statement ---

    def statement(self, after: str | None, limit: int | None, cutoff: dt.datetime | None = None) -> Select[Any]:
        relation = self.relation()
        names = self._names
        change_names = self._resolved(self._change_columns())
        change = [relation.c[c] for c in change_names]
        keep = set(change_names)
        lenient = self.engine.dialect.name == "sqlite" and isinstance(relation, Table)
        stmt = select(
            *(relation.c[c] if c in keep or not lenient else _lenient(relation.c[c]) for c in names)
        ).order_by(*change)
        mode = self.spec.mode
        # A query's column types are unknown: bind untyped, so the database reads the value as the column's type
        # (typed as text, PostgreSQL would refuse to compare a timestamp with it).
        bind = (lambda v: v) if isinstance(relation, Table) else (lambda v: literal(v, NullType()))
        if mode is ChangeMode.SNAPSHOT:
            _listing, resume = position.decode_snapshot(after, len(change))
            if resume is not None:
                values = tuple(map(bind, position.restore(resume, self._types)))
                stmt = stmt.where(change[0] > values[0] if len(change) == 1 else tuple_(*change) > tuple_(*values))
        elif after is not None:
            values = tuple(map(bind, position.decode(after, self._types)))
            if mode is ChangeMode.INCREMENTING:
                stmt = stmt.where(change[0] > values[0])
            else:
                ts, key = change
                # ts >= :ts narrows by the index first; the OR keeps rows that share the last timestamp.
                stmt = stmt.where(and_(ts >= values[0], or_(ts > values[0], key > values[1])))
        if mode is ChangeMode.TIMESTAMP:
            stmt = stmt.where(change[0].is_not(None))
            if cutoff is not None:
                stmt = stmt.where(change[0] <= bindparam("settle_cutoff", cutoff, type_=DateTime(bool(self._aware))))
        if limit is not None:
            stmt = stmt.limit(limit)
        return stmt

    def settle_cutoff(self, conn: Connection) -> dt.datetime:
        """The database's now minus `settle_delay`, in the source's time zone (naive for naive columns)."""
        self.relation()  # reflected or probed: what the column's zone awareness is known from
        dialect = conn.dialect.name
        raw = conn.execute(text(_UTC_NOW.get(dialect, "SELECT CURRENT_TIMESTAMP"))).scalar_one()
        now: dt.datetime = dt.datetime.fromisoformat(raw) if isinstance(raw, str) else raw
        if now.tzinfo is None:
            # Only the generic CURRENT_TIMESTAMP is local time; the dialects listed give UTC.
            now = now.replace(tzinfo=dt.UTC if dialect in _UTC_NOW else self.spec.zone)
        # Subtract in UTC: wall-clock arithmetic in the local zone is an hour off across a DST change.
        local = (now.astimezone(dt.UTC) - dt.timedelta(seconds=self.spec.settle_delay)).astimezone(self.spec.zone)
        if self._aware is None:
            self._aware = self._returns_zoned(conn)
        return local if self._aware else local.replace(tzinfo=None)

    def _returns_zoned(self, conn: Connection) -> bool | None:
        """Does the query's timestamp column hold zoned values? One value tells; None while it has no rows.

        Compared with a naive cutoff, a zoned column would be read in the server's session
        zone, not the source's: off by the difference, unsettled rows let through.
        """
        relation = self.relation()
        ts = relation.c[self._resolved([str(self.spec.timestamp_column)])[0]]
        value = conn.execute(select(ts).where(ts.is_not(None)).limit(1), self._query_params(None)).scalar()
        if value is None:
            return None
        return isinstance(value, dt.datetime) and value.tzinfo is not None

    # --- reading ---

    def read(self, after: str | None, limit: int | None = None) -> Iterator[RawBatch]:
        limit = limit if limit is not None else self.spec.max_rows_per_poll
        try:
            yield from self._read(after, limit)
        except DBAPIError as exc:
            drift = None if exc.connection_invalidated else self._drift()
            if drift is not None:
                raise drift from None
            raise

    def _read(self, after: str | None, limit: int | None) -> Iterator[RawBatch]:
        with self.engine.connect() as conn:
            cutoff = self.settle_cutoff(conn) if self.spec.settle_delay else None
            stmt = self.statement(after, limit, cutoff)
            last_value = None
            if after is not None and self.spec.mode is not ChangeMode.SNAPSHOT:
                last_value = position.decode(after, self._types)[0]
            result = conn.execution_options(stream_results=True, yield_per=self.spec.batch_size).execute(
                stmt, self._query_params(last_value)
            )
            columns = tuple(self._names)
            slots = [columns.index(c) for c in self._resolved(self._change_columns())]
            ops = self._ops(columns)
            if self.spec.mode is ChangeMode.SNAPSHOT:
                yield from self._listing(result.partitions(), columns, slots, ops, after, limit)
                return
            encode = position.encode
            for rows in result.partitions():  # Rows index like tuples; copying them costs a tenth of the read
                if len(slots) == 1:
                    s = slots[0]
                    positions = [encode((r[s],)) for r in rows]
                else:
                    a, b = slots
                    positions = [encode((r[a], r[b])) for r in rows]
                yield RawBatch(columns, rows, positions, ops(rows) if ops else None)

    def _listing(
        self,
        partitions: Iterator[Sequence[Any]],
        columns: tuple[str, ...],
        slots: list[int],
        ops: Callable[[Sequence[Any]], list[str]] | None,
        after: str | None,
        limit: int | None,
    ) -> Iterator[RawBatch]:
        """Snapshot batches; the last one of a listing that reached the end says `complete`."""
        number, _resume = position.decode_snapshot(after, len(slots))
        encode = position.encode
        held: Sequence[Any] | None = None
        count = 0
        for rows in partitions:
            if held is not None:
                yield self._snapshot_batch(columns, held, slots, number, ops, complete=False)
            held, count = rows, count + len(rows)
        # A read cut short by `limit` has not seen the end of the relation: the next poll resumes it.
        complete = limit is None or count < limit
        if held is None:
            if complete:
                yield RawBatch(columns, [], [], keyed=True, complete=True, end=encode((number,)))
            return
        yield self._snapshot_batch(columns, held, slots, number, ops, complete=complete)

    def _snapshot_batch(
        self,
        columns: tuple[str, ...],
        rows: Sequence[Any],
        slots: list[int],
        number: int,
        ops: Callable[[Sequence[Any]], list[str]] | None,
        *,
        complete: bool,
    ) -> RawBatch:
        end = position.encode((number,)) if complete else None
        positions = _ListingPositions(number, rows, slots)
        return RawBatch(columns, rows, positions, ops(rows) if ops else None, keyed=True, complete=complete, end=end)

    def _ops(self, columns: tuple[str, ...]) -> Callable[[Sequence[Any]], list[str]] | None:
        rule, spec = self._is_deleted, self.spec.soft_delete
        if rule is None or spec is None:
            return None
        slot = columns.index(self._resolved([spec.column])[0])
        return lambda rows: [DELETED if rule(r[slot]) else UPSERTED for r in rows]

    def _drift(self) -> SchemaDrift | None:
        """After a failed read: has the schema changed under us? Then say so, by column."""
        self._from = None
        try:
            self.relation()
        except SchemaDrift as drift:
            return drift
        except Exception:  # unreachable, or anything else: the original error tells more
            self._from = None
        return None

    def check(self) -> str:
        relation = self.relation()
        with self.engine.connect() as conn:
            conn.execute(select(relation.c[self._names[0]]).limit(1), self._query_params(None)).all()
        # An ODBC connection string may carry PWD=…: name only the kind of connection.
        url = "odbc" if self.spec.url.startswith("odbc:") else self.engine.url.render_as_string(hide_password=True)
        what = f"table {self.spec.table}" if self.spec.table is not None else "query"
        return f"{url} {what}: {len(self._names)} columns, mode {self.spec.mode.value}"

    def close(self) -> None:
        self.engine.dispose()


class _ListingPositions(Sequence[str]):
    """A snapshot batch's positions `[listing, key…]`, each encoded when first asked for.

    In a listing nearly every row is unchanged and its position is never used: only
    changed rows (their events) and the last one (where the source stands) need one.
    """

    def __init__(self, number: int, rows: Sequence[Any], slots: list[int]) -> None:
        self._number, self._rows, self._slots = number, rows, slots

    def __len__(self) -> int:
        return len(self._rows)

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[str]: ...
    def __getitem__(self, index: int | slice) -> str | Sequence[str]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        row = self._rows[index]
        return position.encode((self._number, *(row[s] for s in self._slots)))


def _soft_delete_rule(spec: SoftDeleteSpec, encoding: str) -> Callable[[Any], bool]:
    """Whether a raw value of the soft-delete column marks the row deleted.

    Legacy flags come as 'J', 'Y ', b'1', 1, True…: text is compared trimmed, a boolean
    target by truth value, a number by value.
    """
    if spec.not_null:
        return lambda value: value is not None
    target = spec.value

    def text_of(value: Any) -> str:
        if isinstance(value, (bytes, bytearray, memoryview)):
            return bytes(value).decode(encoding, "replace").strip()
        return str(value).strip()

    if isinstance(target, bool):

        def truth(value: Any) -> bool:
            if value is None:
                return False
            try:
                return bool(boolean(value)) is target
            except ValueError:
                return False

        return truth
    wanted = str(target).strip()
    return lambda value: value is not None and text_of(value) == wanted


class _Lenient(TypeDecorator[Any]):
    """Convert as the declared type says, or pass the raw value on when it does not fit.

    SQLite stores any value in any column ('twelve' in a DECIMAL); SQLAlchemy's
    converters then raise and would fail the whole batch forever. Passed on raw,
    the mapping's coercion turns that one row into a dead letter instead.
    """

    impl = NullType
    cache_ok = True

    def __init__(self, declared: TypeEngine[Any]) -> None:
        super().__init__()
        self.declared = declared

    def result_processor(self, dialect: Dialect, coltype: Any) -> Any:
        convert = self.declared.dialect_impl(dialect).result_processor(dialect, coltype)
        if convert is None:
            return None

        def process(value: Any) -> Any:
            try:
                return convert(value)
            except (TypeError, ValueError, ArithmeticError):
                return value

        return process


def _lenient(col: Any) -> ColumnElement[Any]:
    return type_coerce(col, _Lenient(col.type)).label(col.name)


def _python_type(sql_type: Any) -> type | None:
    try:
        kind = sql_type.python_type
    except NotImplementedError:
        return None
    return kind if isinstance(kind, type) else None
