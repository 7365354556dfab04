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
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack, closing
from dataclasses import replace
from functools import partial
from itertools import chain
from sys import getsizeof
from typing import Any, overload

from sqlalchemy import (
    ColumnElement,
    DateTime,
    FromClause,
    Integer,
    MetaData,
    Numeric,
    Select,
    String,
    Table,
    and_,
    bindparam,
    cast,
    column,
    exists,
    func,
    literal_column,
    or_,
    select,
    text,
    tuple_,
    type_coerce,
)
from sqlalchemy.dialects import mysql, postgresql
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.exc import DataError, DBAPIError, NoSuchTableError
from sqlalchemy.sql.expression import Exists
from sqlalchemy.types import Float, LargeBinary, NullType, Text, TypeDecorator, TypeEngine

import adapters.db.budget as budgets
from adapters.db import digest, keys, position, settle
from adapters.db.budget import DATABASES, Database
from adapters.db.direct import Direct, batchable
from adapters.db.engine import set_autocommit
from straw import sql_guard
from straw.coerce import Unreadable, boolean
from straw.config import ChangeMode, DatabaseSpec, DbSourceSpec, SoftDeleteSpec
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


_STREAM = {"stream_results": True}


class DbSource:
    def __init__(
        self,
        spec: DbSourceSpec,
        columns: list[str],
        engine: Engine | None = None,
        *,
        key_columns: Sequence[str] = (),
        database: DatabaseSpec | None = None,
        digest_salt: str = "",
    ) -> None:
        """`columns`: the source columns the mapping needs; change columns are added here.

        `key_columns`: the entity key's columns (snapshot mode orders and resumes by them).
        `database`: the budget of the database at `spec.url`, whose engine this source shares
        with every other source there (an `engine` given instead is this source's own).
        `digest_salt`: what shapes the canonical record (the mapper's `shape_id`), keying a snapshot's
        database digests as the Python digests are keyed.
        """
        self.name = spec.name
        self.spec = spec
        self._shared = engine is None
        if engine is None:
            self.database = DATABASES.open(
                database or DatabaseSpec(url=spec.url), statement_timeout=spec.statement_timeout, encoding=spec.encoding
            )
        else:
            self.database = Database(database or DatabaseSpec(url=spec.url), engine)
        self.engine = self.database.engine
        self._keys = list(key_columns)
        soft = [spec.soft_delete.column] if spec.soft_delete else []
        self._wanted = list(dict.fromkeys([*columns, *self._change_columns(), *soft]))
        self._from: FromClause | None = None
        self._statements: dict[tuple[Any, ...], Select[Any]] = {}  # by shape, for `_from` (see `_statement`)
        self._statements_of: FromClause | None = None
        self._names: list[str] = []  # the wanted columns as the relation spells them, each once
        self._spelled: dict[str, str] = {}  # wanted name -> the relation's spelling
        self._types: tuple[type | None, ...] = ()  # python types of the change columns (None: as stored)
        self._recast: dict[str, Recast] = {}  # columns whose driver text is not their value: read as (`_value`)
        self._aware: bool | None = False  # the timestamp column keeps a time zone (None: not known yet)
        self._last_value: Any = None  # the watermark of the read under way (a settle probe binds it too)
        self._after: str | None = None  # the position the read under way starts after
        self._watermark: dict[str, Any] = {}  # its values, as the statements bind them (`straw_w0`…)
        # The last position decoded (position, types, last value, after, watermark), the relation's columns
        # (relation, columns, change column slots, soft-delete ops) and the probe's parameters: an idle poll's
        # are the last one's.
        self._decoded: tuple[str | None, tuple[type | None, ...], Any, str | None, dict[str, Any]] | None = None
        self._shape: tuple[FromClause, tuple[str, ...], list[int], Callable[[Sequence[Any]], list[str]] | None] | None
        self._shape = None
        self._probe_params: tuple[dict[str, Any], Any, dict[str, Any]] | None = None
        self._polled_at: float | None = None  # when its last read started (monotonic)
        self._idle_direct: tuple[Any, Direct] | None = None  # the batched idle probe: the EXISTS, run straight
        self._idle_params: tuple[Any, dict[str, Any]] | None = None  # and its parameters, by decoded position
        self._bound = settle.OPEN  # the settle bound of the last read (narrowing a failed read keeps to it)
        self._width = 0  # bytes per row, as last measured (0: not yet): sizes the first page of a read
        self._is_deleted = _soft_delete_rule(spec.soft_delete, spec.encoding) if spec.soft_delete else None
        self._digest_salt = digest_salt
        self._digest: digest.Choice | None = None  # snapshot mode: where row digests are computed (once reflected)
        self.settle: settle.Technique = settle.choose(
            self.engine.dialect.name, settle=spec.settle, delay=spec.settle_delay,
            timestamp=spec.mode is ChangeMode.TIMESTAMP, source=spec.name, fallback=spec.settle_fallback,
        ) if spec.mode is not ChangeMode.SNAPSHOT else settle.Off("snapshot mode lists every row")
        # PostgreSQL's ledger skips the read when nothing is after the watermark: that question alone may be
        # asked for several sources of the database at once (`Database.nothing_after`).
        self._batches = (self._shared and isinstance(self.settle, settle.Ledger)
                         and self.engine.dialect.name == "postgresql" and spec.schedule is None)
        if self._batches:
            self.database.join(self)

    def _change_columns(self) -> list[str]:
        if self.spec.mode is ChangeMode.INCREMENTING:
            return [str(self.spec.incrementing_column)]
        if self.spec.mode is ChangeMode.TIMESTAMP:
            return [str(self.spec.timestamp_column), str(self.spec.key_column)]
        if not self._keys:
            raise ValueError(f"source {self.name!r}: mode 'snapshot' needs the entity's key columns")
        return self._keys

    # --- the relation: a reflected table, or the configured query as a subquery ---

    def connect(self, *, autocommit: bool = False) -> AbstractContextManager[Connection]:
        """A connection from the database's budget, in turn with the other sources on it (`autocommit`: see
        `Database.connect`)."""
        return self.database.connect(
            statement_timeout=self.spec.statement_timeout, encoding=self.spec.encoding, autocommit=autocommit)

    def relation(self, conn: Connection | None = None) -> FromClause:
        """`conn`: the connection in hand, if any (a second one could wait forever on a budget of one)."""
        if self._from is None:
            if conn is None:
                with self.connect() as own:
                    return self.relation(own)
            self._from = self._reflect(conn) if self.spec.table is not None else self._probe(conn)
        return self._from

    def _reflect(self, conn: Connection) -> FromClause:
        name = str(self.spec.table)
        try:
            table = Table(name, MetaData(), schema=self.spec.db_schema, autoload_with=conn)
        except NoSuchTableError:
            raise SchemaDrift(
                f"source {self.name!r}: table {name!r} not found; check `table` (and `schema`)"
            ) from None
        self._names = self._resolve([c.name for c in table.columns], f"table {name!r}")
        self._recast = {c.name: kind for c in table.columns if (kind := _recast(conn.dialect.name, c.type))}
        for col in table.columns:
            if isinstance(col.type, Float) and col.type.asdecimal:
                # SQLAlchemy reads a MySQL/MariaDB DOUBLE as a Decimal rounded to 10 places (1e-30 became 0):
                # read as the float it is, whose shortest repr the mapping takes.
                col.type = Float(asdecimal=False)
        change = [table.c[c] for c in self._resolved(self._change_columns())]
        self._types = tuple(_python_type(c.type) for c in change)
        self._aware = bool(getattr(change[0].type, "timezone", False))
        return table

    def _probe(self, conn: Connection) -> FromClause:
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
        probe = select(text("*")).select_from(relation.columns().subquery("q")).where(text("1 = 0"))
        result = conn.execute(probe, self._query_params(None))
        returned = list(result.keys())
        recast = _recast_results(conn.dialect.name, result.cursor.description if result.cursor else None)
        result.close()
        self._names = self._resolve(returned, "`query`")
        self._recast = {returned[i]: kind for i, kind in recast.items()}
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

    def _value(self, relation: FromClause, name: str) -> ColumnElement[Any]:
        """The column `name` as its rows' values are read: where the driver's value is not the stored one
        (see `_RECAST`), an expression whose is. A MySQL/MariaDB FLOAT's own text keeps 6 significant digits
        (16777216 would read as 16777200): + 0e0 gives the stored value exactly. A PostgreSQL money's text is
        formatted for lc_monetary (`$1,234,567.89`): read as a numeric. A MySQL TIME, a PostgreSQL interval:
        read as the database's own text."""
        col = relation.c[name]
        read_as = self._recast.get(name)
        return col if read_as is None else read_as(col).label(name)

    def _query_params(self, last_value: Any) -> dict[str, Any]:
        params: dict[str, Any] = dict(self.spec.params)
        if self.spec.uses_last_value:
            params["last_value"] = self.spec.start_value if last_value is None else last_value
        return params

    # --- the statement ---

    def statement(self, after: str | None, limit: int | None, cutoff: Any = None) -> Select[Any]:
        """The read of the rows after `after`, its values bound. `cutoff`: take only rows whose first
        change column is at or below it (what has settled)."""
        stmt, params, _values = self._statement(after, limit, cutoff)
        return stmt.params(params)

    def _statement(
        self, after: str | None, limit: int | None, cutoff: Any
    ) -> tuple[Select[Any], dict[str, Any], tuple[Any, ...]]:
        """The read's statement, its parameters and the watermark's values.

        The statement is built once per shape (watermark or not, limit, cutoff) and kept:
        an idle poll constructs no expression, and SQLAlchemy finds its compiled form in
        the cache. Only the values change, as bound parameters.
        """
        relation = self.relation()
        values: tuple[Any, ...] = ()
        if self.spec.mode is ChangeMode.SNAPSHOT:
            _listing, resume = position.decode_snapshot(after, len(self._change_columns()))
            if resume is not None:
                values = tuple(position.restore(resume, self._types))
        elif after is not None:
            values = tuple(position.decode(after, self._types))
        kind = None if cutoff is None else (
            ("aware" if cutoff.tzinfo is not None else "naive") if isinstance(cutoff, dt.datetime) else "value")
        stmt: Select[Any] = self._kept(
            (len(values), limit, kind), lambda: self._build(relation, len(values), limit, kind))
        params = {f"straw_w{i}": v for i, v in enumerate(values)}
        if cutoff is not None:
            params["settle_cutoff"] = cutoff
        return stmt, params, values

    def _after_clauses(self, relation: FromClause, bound: int) -> list[ColumnElement[bool]]:
        """The rows after a watermark of `bound` values (none: every row), as the page query and the
        settle probe's EXISTS both select them: one predicate, so the probe can never disagree with the read."""
        change = [relation.c[c] for c in self._resolved(self._change_columns())]
        mode = self.spec.mode
        # A query's column types are unknown: bind untyped, so the database reads the value as the column's type
        # (typed as text, PostgreSQL would refuse to compare a timestamp with it).
        typed = isinstance(relation, Table)
        values = tuple(
            bindparam(f"straw_w{i}", type_=change[i].type if typed else NullType()) for i in range(bound)
        )
        clauses: list[ColumnElement[bool]] = []
        if values and mode is ChangeMode.SNAPSHOT:
            clauses.append(change[0] > values[0] if len(change) == 1 else tuple_(*change) > tuple_(*values))
        elif values and mode is ChangeMode.INCREMENTING:
            clauses.append(change[0] > values[0])
        elif values:
            ts, key = change
            # ts >= :ts narrows by the index first; the OR keeps rows that share the last timestamp.
            clauses.append(and_(ts >= values[0], or_(ts > values[0], key > values[1])))
        if mode is ChangeMode.TIMESTAMP:
            clauses.append(change[0].is_not(None))
        return clauses

    def _kept(self, shape: tuple[Any, ...], build: Callable[[], Any]) -> Any:
        """The statement of `shape` over the current relation, built on first use and kept with it."""
        relation = self.relation()
        if self._statements_of is not relation:  # reflected again (after a drift): build anew
            self._statements, self._statements_of = {}, relation
        stmt = self._statements.get(shape)
        if stmt is None:
            stmt = self._statements[shape] = build()
        return stmt

    def _build(self, relation: FromClause, bound: int, limit: int | None, settle: str | None) -> Select[Any]:
        names = self._names
        change_names = self._resolved(self._change_columns())
        change = [relation.c[c] for c in change_names]
        keep = set(change_names)
        lenient = self.engine.dialect.name == "sqlite" and isinstance(relation, Table)
        stmt = select(
            *(self._value(relation, c) if c in keep or not lenient else _lenient(relation.c[c]) for c in names)
        ).order_by(*change)
        typed = isinstance(relation, Table)
        for clause in self._after_clauses(relation, bound):
            stmt = stmt.where(clause)
        if settle is not None:
            # A settled cutoff: a time (zoned or naive, as the column compares) or a value of the column itself.
            kind = DateTime(settle == "aware") if settle in ("aware", "naive") else (
                change[0].type if typed else NullType())
            stmt = stmt.where(change[0] <= bindparam("settle_cutoff", type_=kind))
        if limit is not None:
            stmt = stmt.limit(limit)
        return stmt

    def db_now(self, conn: Connection) -> dt.datetime:
        """The database's clock, as an aware UTC time: a settle window must not depend on this host's clock."""
        dialect = conn.dialect.name
        raw = conn.execute(text(_UTC_NOW.get(dialect, "SELECT CURRENT_TIMESTAMP"))).scalar_one()
        now: dt.datetime = dt.datetime.fromisoformat(raw) if isinstance(raw, str) else raw
        if now.tzinfo is None:
            # Only the generic CURRENT_TIMESTAMP is local time; the dialects listed give UTC.
            now = now.replace(tzinfo=dt.UTC if dialect in _UTC_NOW else self.spec.zone)
        return now.astimezone(dt.UTC)

    def column_time(self, conn: Connection, utc: dt.datetime) -> dt.datetime:
        """An instant as the timestamp column compares: in the source's zone, naive for naive columns."""
        self.relation()  # reflected or probed: what the column's zone awareness is known from
        local = utc.astimezone(self.spec.zone)
        if self._aware is None:
            self._aware = self._returns_zoned(conn)
        return local if self._aware else local.replace(tzinfo=None)

    def top_query(self) -> Select[Any]:
        """The highest value of the first change column: what a settle technique holds against open writers.

        Built once per relation: the same object each poll, so the settle technique keeps its statement too."""
        relation = self.relation()
        top: Select[Any] = self._kept(
            ("top",), lambda: select(func.max(relation.c[self._resolved(self._change_columns())[0]])))
        return top

    def beyond_query(self) -> Exists | None:
        """EXISTS a row after the watermark of the read under way (None: no watermark, every row is after it).

        The page query's own predicate (`_after_clauses`), compared by the database in the column's type
        and collation, never in Python: a stored position's text, a case-insensitive key or a tie on the
        timestamp with a higher key are judged exactly as the read would judge them."""
        if self._after is None:
            return None
        return self._beyond(self.relation(), len(self._watermark))

    def _beyond(self, relation: FromClause, bound: int) -> Exists:
        beyond: Exists = self._kept(("beyond", bound), lambda: exists().select_from(relation).where(
            *self._after_clauses(relation, bound)))
        return beyond

    def idle_probe(self, conn: Connection) -> tuple[Any, Direct, dict[str, Any]] | None:
        """The question an idle poll asks, for a batch (`Database.nothing_after`): the watermark it is about
        (the very objects: relation and decoded position), the EXISTS of a row after it, its parameters.
        None: not to be batched now (no watermark yet, a settle window, not runnable straight)."""
        decoded, relation = self._decoded, self._from
        if decoded is None or relation is None or decoded[3] is None:
            return None
        watermark = decoded[4]
        beyond = self._beyond(relation, len(watermark))
        kept = self._idle_direct
        if kept is None or kept[0] is not beyond:
            kept = self._idle_direct = (beyond, Direct(select(beyond)))
        if not batchable(kept[1], conn):
            return None
        params = self._idle_params
        if params is None or params[0] is not decoded:
            params = self._idle_params = (decoded, {**self._query_params(decoded[2]), **watermark})
        return (relation, decoded), kept[1], params[1]

    @property
    def session_key(self) -> tuple[str, float | None]:
        return self.spec.encoding, self.spec.statement_timeout

    def due_within(self, now: float) -> float | None:
        """How long an idle answer taken `now` holds for this source, if its next poll is due within that long."""
        if self._polled_at is None:
            return None
        window = min(budgets.BATCH_WINDOW, budgets.BATCH_SHARE * self.spec.poll_interval)
        return window if self._polled_at + self.spec.poll_interval - now <= window else None

    def params(self) -> dict[str, Any]:
        """The parameters of `top_query` and `beyond_query` for the read under way (not to be changed: the
        same dict while the watermark stands)."""
        kept = self._probe_params
        if kept is None or kept[0] is not self._watermark or kept[1] is not self._last_value:
            kept = self._probe_params = (
                self._watermark, self._last_value, {**self._query_params(self._last_value), **self._watermark})
        return kept[2]

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

    def restore(self, memo: str | None) -> None:
        """The id gaps given up before a restart, still watched (see `settle.GapWatch`)."""
        gaps = settle.gap_watch(self.settle)
        if gaps is not None:
            gaps.restore(memo)

    def _read(self, after: str | None, limit: int | None) -> Iterator[RawBatch]:
        gaps = settle.gap_watch(self.settle)
        if gaps is None:
            yield from self._changes(after, limit)
            return
        for batch in self._changes(after, limit):
            after = batch.next_position
            # The batch that passes a gap commits the watch of it with its position: a restart keeps watching.
            yield gaps.carry(batch)
        yield from self._late_commits(gaps, after)

    def _late_commits(self, gaps: settle.GapWatch, after: str | None) -> Iterator[RawBatch]:
        """Rows committed into id gaps the settle window gave up (a transaction longer than the window): the
        read after the watermark never sees them. Looked for in the gaps given up lately, once a window."""
        if not gaps.late:
            return
        expected = _integral_after(after, self._types)
        if expected is None or not (due := gaps.due(expected - 1)):  # at or below the watermark's id only
            return
        assert self._shape is not None  # the read before set it: its watermark is `after`
        relation, columns, slots, ops = self._shape
        ident = relation.c[columns[slots[0]]]
        stmt = (select(*(self._value(relation, c) for c in columns))
                .where(or_(*(ident.between(first, last) for first, last in due))).order_by(ident))
        with self.connect() as conn:
            rows = conn.execute(stmt, self._query_params(None)).fetchall()
        if not rows:
            return
        ids = [int(r[slots[0]]) for r in rows]
        settle.log.warning(
            "settle: rows committed into id gaps the settle window had given up, delivered now; a transaction "
            "outlasted the window: raise `settle_fallback` (or `settle_delay`)",
            source=self.name, ids=ids[:20], count=len(ids), window_s=gaps.window,
        )
        yield gaps.carry(replace(self._batch(rows, columns, slots, ops), end=after, late=True), delivering=ids)

    def _changes(self, after: str | None, limit: int | None) -> Iterator[RawBatch]:
        """Stream from `after`; a batch the driver cannot decode is narrowed to its row, and the read goes on."""
        failed: list[BaseException] = []
        while True:
            failed.clear()
            for batch in self._stream(after, limit, failed):
                after = batch.next_position
                limit = None if limit is None else limit - len(batch.rows)
                yield batch
            if not failed:
                return
            moved = False
            for batch in self._narrow(after, limit, failed[0]):
                after, moved = batch.next_position, True
                limit = None if limit is None else limit - len(batch.rows)
                yield batch
            if not moved:
                raise failed[0]  # nothing to narrow to: not a value of a row after all
            if limit is not None and limit <= 0:
                return

    def _stream(self, after: str | None, limit: int | None, failed: list[BaseException]) -> Iterator[RawBatch]:
        """Batches read after `after`; a fetch the driver cannot decode ends them early, the error in `failed`."""
        # A poll of the changes starts with the settle probe, in autocommit (most often the poll's only statement).
        with self.connect(autocommit=self.spec.mode is not ChangeMode.SNAPSHOT) as conn:
            relation = self.relation(conn)  # the change columns' types decode the position
            watermark = self._decoded
            if watermark is None or watermark[0] != after or watermark[1] is not self._types:
                # An idle source polls from the same position again and again: decoded once, while it stands.
                values: tuple[Any, ...] = ()
                if after is not None and self.spec.mode is not ChangeMode.SNAPSHOT:
                    values = position.decode(after, self._types)
                watermark = self._decoded = (
                    after, self._types, values[0] if values else None, after if values else None,
                    {f"straw_w{i}": v for i, v in enumerate(values)},
                )
            _after, _types, self._last_value, self._after, self._watermark = watermark
            self._polled_at = time.monotonic()
            shape = self._shape
            if shape is None or shape[0] is not relation:
                columns = tuple(self._names)
                slots = [columns.index(c) for c in self._resolved(self._change_columns())]
                shape = self._shape = (relation, columns, slots, self._ops(columns))
            _relation, columns, slots, ops = shape
            if self.spec.mode is ChangeMode.SNAPSHOT and self.digest_choice().database:
                yield from self._digest_listing(conn, after, limit, columns, slots, ops)
                return
            if self.spec.mode is ChangeMode.SNAPSHOT:
                # One listing, one cursor: the whole relation as of one moment, streamed in chunks.
                stmt, params, _values = self._statement(after, limit, None)
                params.update(self._query_params(None))
                with closing(self._streamed(conn, stmt, params, failed)) as chunks:
                    yield from self._listing(chunks, columns, slots, ops, after, limit, failed)
                return
            # Before the rows are read: on MariaDB the settle check ends the connection's transaction,
            # so the read below gets a view of its own, taken after the open writers were seen.
            if self._batches and self.database.nothing_after(self, conn):
                self._bound = settle.HOLD  # as the ledger's own probe: nothing after the watermark, no read
                return
            bound = self._bound = self.settle.bound(conn, self)
            if bound.hold:
                return
            set_autocommit(conn, False)  # the rest of the read (a cursor streaming pages) needs a transaction
            yield from self._pages(conn, after, limit, bound, columns, slots, ops, failed)

    def _pages(
        self,
        conn: Connection,
        after: str | None,
        limit: int | None,
        bound: settle.Bound,
        columns: tuple[str, ...],
        slots: list[int],
        ops: Callable[[Sequence[Any]], list[str]] | None,
        failed: list[BaseException],
    ) -> Iterator[RawBatch]:
        """Rows after the watermark: a first page by a plain query, the rest (if any) from one cursor.

        Most polls find nothing or less than a page: for them one statement (which the
        driver prepares once it has seen it a few times), not a server-side cursor
        declared, fetched from and closed. A backlog beyond the first page streams from
        one cursor resuming after it: one sort, not one per page on an unindexed column.
        The first page holds what the byte budget allows at the rows' last measured width, since
        a plain query's rows arrive all at once; until a read has measured it, the cursor reads all.
        """
        cutoff, gaps = bound.cap, bound.gaps
        expected = _integral_after(after, self._types)
        stop = False
        if self._width:  # the rows' width is known: a first page within the byte budget, by a plain query
            page = self.spec.batch_size if limit is None else min(self.spec.batch_size, limit)
            page = min(page, max(1, self.spec.batch_bytes // self._width))
            stmt, params, values = self._statement(after, page, cutoff)
            params.update(self._query_params(values[0] if values else None))
            try:
                rows: Sequence[Any] = conn.execute(stmt, params).fetchall()  # Rows index like tuples: not copied
            except Exception as exc:
                if not _undecodable(exc):
                    raise
                failed.append(exc)
                return
            if not rows:
                return
            fetched = len(rows)
            self._width = _width(rows)
            if gaps is not None:
                rows, expected, stop = _admitted(gaps, expected, rows, slots[0])
            if not rows:
                return
            first = self._batch(rows, columns, slots, ops)
            yield first
            if stop or fetched < page or limit == page:
                return
            after, limit = first.positions[-1], None if limit is None else limit - page
        stmt, params, values = self._statement(after, limit, cutoff)
        params.update(self._query_params(values[0] if values else None))
        with closing(self._streamed(conn, stmt, params, failed)) as chunks:
            for rows in chunks:
                if gaps is not None:
                    rows, expected, stop = _admitted(gaps, expected, rows, slots[0])
                if rows:
                    yield self._batch(rows, columns, slots, ops)
                if stop:
                    return

    def _streamed(
        self, conn: Connection, stmt: Select[Any], params: dict[str, Any], failed: list[BaseException]
    ) -> Generator[list[Any], None, None]:
        """The rows of `stmt` from one server-side cursor, in chunks within the byte budget; a value the
        driver cannot decode ends them, its error in `failed` (the caller narrows the read to that row)."""
        try:
            result = conn.execute(stmt, params, execution_options=_STREAM)  # this statement's: the connection is kept
        except Exception as exc:
            if not _undecodable(exc):
                raise
            failed.append(exc)
            return
        try:
            yield from _guarded(self._chunks(result.fetchmany), failed)
        finally:
            result.close()

    def _chunks(self, fetch: Callable[[int], Sequence[Any]]) -> Iterator[list[Any]]:
        """Rows in batches of `batch_size`, or fewer when they would hold more than `batch_bytes`."""
        for rows in _chunks(fetch, self.spec.batch_size, self.spec.batch_bytes):
            self._width = _width(rows)
            yield rows

    @staticmethod
    def _batch(
        rows: Sequence[Any],
        columns: tuple[str, ...],
        slots: list[int],
        ops: Callable[[Sequence[Any]], list[str]] | None,
    ) -> RawBatch:
        encode = position.encode
        if len(slots) == 1:
            s = slots[0]
            positions = [encode((r[s],)) for r in rows]
        else:
            a, b = slots
            positions = [encode((r[a], r[b])) for r in rows]
        return RawBatch(columns, rows, positions, ops(rows) if ops else None)

    def _params_after(self, after: str | None) -> dict[str, Any]:
        last_value = None
        if after is not None and self.spec.mode is not ChangeMode.SNAPSHOT:
            last_value = position.decode(after, self._types)[0]
        return self._query_params(last_value)

    def _narrow(
        self, after: str | None, limit: int | None, error: BaseException
    ) -> Iterator[RawBatch]:
        """Re-read after `after` in halving pieces down to the one row the driver cannot decode.

        The good rows before it are delivered; that row is read again column by column
        (each failing column raw, as text or bytes, wrapped in `Unreadable`), so the mapping
        makes it a dead letter and the position moves past it. Bounded: about
        2·log2(batch_size) small reads. An error that is not the data's (the row cannot
        be found, its raw form cannot be read either) is raised as it came.
        """
        columns = tuple(self._names)
        slots = [columns.index(c) for c in self._resolved(self._change_columns())]
        ops = self._ops(columns)
        make: Callable[[Sequence[Any]], RawBatch]
        if self.spec.mode is ChangeMode.SNAPSHOT:
            number, _resume = position.decode_snapshot(after, len(slots))
            make = partial(self._snapshot_batch, columns, slots=slots, number=number, ops=ops, complete=False)
        else:
            make = partial(self._batch, columns=columns, slots=slots, ops=ops)
        # The settle bound of the read that failed: narrowing takes no more than it would have.
        cutoff, gaps = self._bound.cap, self._bound.gaps
        size = max(1, min(self.spec.batch_size, limit or self.spec.batch_size) // 2)
        while limit is None or limit > 0:
            piece = size if limit is None else min(size, limit)
            try:
                with self.connect() as conn:
                    rows = conn.execute(self.statement(after, piece, cutoff), self._params_after(after)).all()
            except Exception as exc:
                if not _undecodable(exc):
                    raise
                if size > 1:
                    size //= 2
                    continue
                row = self._unreadable_row(after, cutoff, exc)
                if row is None:
                    raise error from None
                yield make([row])
                return
            if not rows:
                return  # the row is gone since: nothing to narrow
            fetched = len(rows)
            if gaps is not None and self.spec.mode is not ChangeMode.SNAPSHOT:
                expected = _integral_after(after, self._types)
                rows, _next, stop = _admitted(gaps, expected, rows, slots[0])
                if not rows:
                    return
                if stop:
                    yield make(rows)
                    return
            batch = make(rows)
            yield batch
            after = batch.next_position
            limit = None if limit is None else limit - len(rows)
            if fetched < piece:
                return

    def _unreadable_row(
        self, after: str | None, cutoff: Any, error: Exception
    ) -> tuple[Any, ...] | None:
        """The next row, each column read alone: those the driver cannot decode read raw, as `Unreadable`."""
        with self.connect() as conn:
            return self._read_columns(conn, self.statement(after, 1, cutoff), self._params_after(after),
                                      _error_text(error))

    def _read_columns(self, conn: Connection, stmt: Select[Any], params: dict[str, Any], why: str
                      ) -> tuple[Any, ...] | None:
        """The one row of `stmt`, each column read alone: those the driver cannot decode read raw, as `Unreadable`."""
        relation = self.relation()
        keep = set(self._resolved(self._change_columns()))
        values: list[Any] = []
        for name in self._names:
            try:
                found = conn.execute(stmt.with_only_columns(self._value(relation, name)), params).first()
            except Exception as exc:
                if not _undecodable(exc) or name in keep:
                    return None  # a change column must be read as it is: it is the position
                conn.rollback()
                try:
                    raw = conn.execute(stmt.with_only_columns(_raw_column(relation.c[name], conn.dialect.name)),
                                       params).first()
                except Exception:
                    return None
                if raw is None:
                    return None
                shown = raw[0] if isinstance(raw[0], str) else repr(raw[0])
                values.append(Unreadable(shown, f"the database driver cannot read {raw[0]!r}: "
                                                f"{_error_text(exc) or why}"))
                continue
            if found is None:
                return None
            values.append(found[0])
        return tuple(values)

    def _listing(
        self,
        partitions: Iterator[Sequence[Any]],
        columns: tuple[str, ...],
        slots: list[int],
        ops: Callable[[Sequence[Any]], list[str]] | None,
        after: str | None,
        limit: int | None,
        failed: list[BaseException] | None = None,
    ) -> Iterator[RawBatch]:
        """Snapshot batches; the last one of a listing that reached the end says `complete`.

        A read that ended on a row the driver cannot decode (`failed`) has not reached the end.
        """
        number, _resume = position.decode_snapshot(after, len(slots))
        encode = position.encode
        held: Sequence[Any] | None = None
        count = 0
        for rows in partitions:
            if held is not None:
                # Rows of one key (a table without a unique key) stay in one batch, where the mapping sees them.
                cut = _key_group_start(held, slots) if _same_key(held[-1], rows[0], slots) else len(held)
                if cut:
                    yield self._snapshot_batch(columns, held[:cut], slots, number, ops, complete=False)
                rows = [*held[cut:], *rows] if cut < len(held) else rows
            held, count = rows, count + len(rows)
        # A read cut short by `limit` has not seen the end of the relation: the next poll resumes it.
        complete = (limit is None or count < limit) and not failed
        if held is None:
            if complete:
                yield RawBatch(columns, [], [], keyed=True, complete=True, end=encode((number,)))
            return
        if not complete:
            # It resumes after the last key: that key's rows must all be in the next read, none in this one.
            cut = _key_group_start(held, slots)
            if cut == 0:
                if failed:
                    return  # the narrowing re-reads them
                cut = len(held)  # a whole read of one key: move on all the same
            held = held[:cut]
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

    # --- snapshot by digests: the database hashes each row, only new and changed rows are read in full ---

    def digest_choice(self) -> digest.Choice:
        """Whether this snapshot source lists the database's digests (see adapters/db/digest.py)."""
        relation = self.relation()
        if self._digest is None or self._statements_of is not relation:
            self._digest = digest.choose(self.spec.digest, self.engine.dialect.name, relation, self._keys)
        return self._digest

    def _digest_listing(
        self,
        conn: Connection,
        after: str | None,
        limit: int | None,
        columns: tuple[str, ...],
        slots: list[int],
        ops: Callable[[Sequence[Any]], list[str]] | None,
    ) -> Iterator[RawBatch]:
        """Pages of `(key…, digest)` in key order, each a plain query resuming after the last key (on the key's
        index); each page a batch whose `fetch` reads the rows of the key_cols the outbox found new or changed.

        Pages, not one cursor: the fetches run on this connection between them (a MariaDB streaming
        cursor allows no other statement until it is drained), and each page is a bounded read.
        While straw compares and commits a page, the database computes the next one's digests (its
        share of the listing's work, most of it) on a second connection, if the budget has one free
        right now; otherwise pages are read in turn on this one.
        """
        number, resume = position.decode_snapshot(after, len(slots))
        relation = self.relation()
        key_cols = [relation.c[c] for c in self._resolved(self._change_columns())]
        width = len(key_cols)
        size = min(keys.BATCH, 10 * self.spec.batch_size)
        listed = 0
        with ExitStack() as lent:
            spare = lent.enter_context(
                self.database.spare(statement_timeout=self.spec.statement_timeout, encoding=self.spec.encoding))
            # A page read on the spare connection may be newer than this one's read view (InnoDB keeps one per
            # transaction): its full reads then begin a new one, so a row is never read older than its digest.
            fresh = spare is not None and self.engine.dialect.name != "postgresql"
            fetch = partial(self._digest_fetch, conn, columns, slots, ops, number, fresh)
            # A pending page is waited for (on leaving, too) before its connection goes back.
            ahead = lent.enter_context(ThreadPoolExecutor(1, "straw-digest")) if spare is not None else None
            page = size if limit is None else min(size, limit)
            query = self._digest_query(relation, key_cols, resume, page)
            rows_of: Callable[[], list[Any]] = partial(_all, conn, *query)
            while True:
                rows = rows_of()
                listed += len(rows)
                done = len(rows) < page  # the relation ended (a page cut by `limit` is not the end)
                end = position.encode((number,)) if done else None
                if not rows:
                    yield RawBatch(columns, [], [], keyed=True, complete=True, end=end)
                    return
                if not done and page > 1 and _same_key(rows[-2], rows[-1], list(range(width))):
                    # A key's rows stay in one page (a relation without a unique key): the next resumes before them.
                    rows = rows[: _key_group_start(rows, list(range(width)))] or rows
                last = done or (limit is not None and listed >= limit)
                if ahead is not None and self.database.gate.waiting:
                    lent.close()  # a poll waits for a connection: the spare goes back (no page is pending now)
                    ahead = spare = None
                if not last:
                    resume = list(rows[-1][:width])
                    page = size if limit is None else min(size, limit - listed)
                    query = self._digest_query(relation, key_cols, resume, page)
                    rows_of = (ahead.submit(_all, spare, *query).result if ahead is not None and spare is not None
                               else partial(_all, conn, *query))
                yield RawBatch(
                    (*self._resolved(self._change_columns()), digest.LABEL), rows,
                    _ListingPositions(number, rows, list(range(width))), keyed=True, complete=done, end=end,
                    digests=[r[width] for r in rows], fetch=partial(fetch, rows),
                )
                if last:
                    return

    def _digest_query(
        self, relation: FromClause, key_cols: list[Any], resume: list[Any] | None, page: int
    ) -> tuple[Select[Any], dict[str, Any]]:
        """The statement and parameters of the digest page of `page` keys after `resume` (None: the first)."""
        values = tuple(position.restore(resume, self._types)) if resume is not None else ()
        stmt = self._digest_page(relation, key_cols, bool(values), page)
        params = {f"straw_w{i}": v for i, v in enumerate(values)}
        params.update(self._query_params(None), straw_salt=self._salt())
        return stmt, params

    def _salt(self) -> str:
        rule = self.spec.soft_delete.model_dump_json() if self.spec.soft_delete else ""
        return f"{digest.VERSION}|{self._digest_salt}|{rule}|{','.join(self._names)}|"

    def _digest_page(self, relation: FromClause, key_cols: list[Any], bound: bool, page: int) -> Select[Any]:
        shape = ("digest-page", bound, page)
        stmt = self._statements.get(shape)
        if stmt is None or self._statements_of is not relation:
            if self._statements_of is not relation:
                self._statements, self._statements_of = {}, relation
            built: Select[Any] = select(*key_cols, self._digest_of(relation)).order_by(*key_cols).limit(page)
            if bound:
                typed = isinstance(relation, Table)
                values = [bindparam(f"straw_w{i}", type_=k.type if typed else NullType())
                          for i, k in enumerate(key_cols)]
                built = built.where(
                    key_cols[0] > values[0] if len(key_cols) == 1 else tuple_(*key_cols) > tuple_(*values))
            stmt = self._statements[shape] = built
        return stmt

    def _digest_of(self, relation: FromClause) -> ColumnElement[bytes]:
        return digest.expression(self.engine.dialect.name, [relation.c[c] for c in self._names])

    def _digest_fetch(
        self,
        conn: Connection,
        columns: tuple[str, ...],
        slots: list[int],
        ops: Callable[[Sequence[Any]], list[str]] | None,
        number: int,
        fresh: bool,
        listed: Sequence[Any],
        indexes: Sequence[int],
    ) -> RawBatch:
        """The full rows (and digests) of the key_cols of `listed[i]` for i in `indexes`, in key order.

        Many of a page: its key range, one index range scan (rows in it that are unchanged are
        found so by their digest again); a few: by key. A row gone since is not there.
        A value the driver cannot decode: its key alone, then that row column by column.
        """
        relation = self.relation()
        key_cols = [relation.c[c] for c in self._resolved(self._change_columns())]
        width = len(key_cols)
        wanted = [tuple(listed[i][:width]) for i in indexes]
        stmt = select(*(self._value(relation, c) for c in self._names), self._digest_of(relation)).order_by(*key_cols)
        if 4 * len(indexes) >= len(listed) and len(indexes) > 1:
            low, high = wanted[0], wanted[-1]
            stmt = stmt.where(tuple_(*key_cols) >= tuple_(*low), tuple_(*key_cols) <= tuple_(*high)) if width > 1 else (
                stmt.where(key_cols[0] >= low[0], key_cols[0] <= high[0]))
        else:
            stmt = stmt.where(digest.key_in(key_cols, wanted))
        params = {**self._query_params(None), "straw_salt": self._salt()}
        if fresh:
            conn.rollback()  # nothing written: only the read view ends
        try:
            found: list[Any] = list(conn.execute(stmt, params).all())
        except Exception as exc:
            if not _undecodable(exc):
                raise
            conn.rollback()
            found = self._fetch_one_by_one(conn, key_cols, wanted, params, exc)
        rows = [tuple(r[:-1]) for r in found]
        return RawBatch(columns, rows, _ListingPositions(number, rows, slots), ops(rows) if ops else None,
                        keyed=True, digests=[r[-1] for r in found])

    def _fetch_one_by_one(
        self, conn: Connection, key_cols: list[Any], wanted: list[tuple[Any, ...]], params: dict[str, Any],
        error: Exception,
    ) -> list[Any]:
        relation = self.relation()
        found: list[Any] = []
        for key in wanted:
            stmt = select(*(self._value(relation, c) for c in self._names), self._digest_of(relation)).where(
                *(k == v for k, v in zip(key_cols, key, strict=True))).order_by(*key_cols)
            try:
                found.extend(conn.execute(stmt, params).all())
            except Exception as exc:
                if not _undecodable(exc):
                    raise
                conn.rollback()
                row = self._read_columns(conn, stmt.limit(1), params, _error_text(exc) or _error_text(error))
                if row is not None:
                    found.append((*row, None))  # no digest: a Python one, and it is read in full again next time
        return found

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
        with self.connect() as conn:
            relation = self.relation(conn)
            conn.execute(select(relation.c[self._names[0]]).limit(1), self._query_params(None)).all()
        # An ODBC connection string may carry PWD=…: name only the kind of connection.
        url = "odbc" if self.spec.url.startswith("odbc:") else self.engine.url.render_as_string(hide_password=True)
        what = f"table {self.spec.table}" if self.spec.table is not None else "query"
        settled = ""
        if self.spec.mode is not ChangeMode.SNAPSHOT:
            with self.connect() as conn:  # one probe: a missing privilege shows (and falls back) here
                self._last_value, self._after, self._watermark = None, None, {}
                self.settle.bound(conn, self)
            settled = f"; settle: {self.settle.name} ({self.settle.why})"
        sweep = keys.describe(self, self._keys) if self._keys else ""
        if self.spec.mode is ChangeMode.SNAPSHOT:
            settled = f"; digest: {self.digest_choice().why}"
        return f"{url} {what}: {len(self._names)} columns, mode {self.spec.mode.value}{settled}{sweep}"

    def position_now(self, at: str) -> str | None:
        """Timestamp mode: the position the row with the key of position `at` has now; None: no such row.

        `straw dlq retry` asks before it sends a dead letter's row again: if the row has changed since it
        failed, its later version was read on its own, and the old one must not follow it onto the bus.
        """
        with self.connect() as conn:
            relation = self.relation(conn)
            ts, key = (relation.c[c] for c in self._resolved(self._change_columns()))
            wanted = position.decode(at, self._types)[1]
            typed = isinstance(relation, Table)  # a query's column types are unknown: bind untyped, as the read does
            match = key == bindparam("straw_key", wanted, type_=key.type if typed else NullType())
            stmt = select(ts, key).where(match).order_by(ts.desc()).limit(1)
            row = conn.execute(stmt, self._query_params(None)).first()
        return None if row is None else position.encode((row[0], row[1]))

    def close(self) -> None:
        if self._batches:
            self.database.leave(self)
        if self._shared:
            DATABASES.close(self.database)
        else:
            self.engine.dispose()


def _all(conn: Connection, stmt: Select[Any], params: dict[str, Any]) -> list[Any]:
    return list(conn.execute(stmt, params).all())


def _integral_after(after: str | None, types: tuple[type | None, ...]) -> int | None:
    """The id right after an incrementing watermark (None: no watermark, or not an integer)."""
    if after is None:
        return None
    value = position.decode(after, types)[0]
    return value + 1 if isinstance(value, int) and not isinstance(value, bool) else None


def _admitted(
    gaps: settle.GapWatch, expected: int | None, rows: Sequence[Any], slot: int
) -> tuple[Sequence[Any], int | None, bool]:
    """The rows the watermark may pass: never an id gap younger than the window (a late commit may fill
    it). Returns them, the id expected next, and whether the read stops here."""
    taken, expected = gaps.admit(expected, [r[slot] for r in rows])
    return (rows if taken == len(rows) else rows[:taken]), expected, taken < len(rows)


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


# What `DbSource._value` reads a recast column as: an expression of the column.
Recast = Callable[[Any], ColumnElement[Any]]


def _as_double(col: Any) -> ColumnElement[Any]:
    widened: ColumnElement[Any] = col + literal_column("0e0")
    return widened


def _as_numeric(col: Any) -> ColumnElement[Any]:
    return cast(col, Numeric())


def _as_text(col: Any) -> ColumnElement[Any]:
    return cast(col, String())


def _as_whole(col: Any) -> ColumnElement[Any]:
    return type_coerce(col + literal_column("0"), Integer())


def _as_address(col: Any) -> ColumnElement[Any]:
    return type_coerce(func.abbrev(col), String())


_RECAST: dict[str, tuple[tuple[type | None, int | type | None, Recast], ...]] = {
    "mysql": (
        (mysql.FLOAT, 4, _as_double),  # MYSQL_TYPE_FLOAT, as PyMySQL, mysqlclient and Connector/Python say
        # A TIME is a duration (-838:59:59 to 838:59:59): the driver makes it a timedelta, and SQLAlchemy a
        # time of day modulo 24 h (-00:00:01 read as 23:59:59). Its own text is its value.
        (mysql.TIME, 11, _as_text),
        (None, dt.time, _as_text),  # pyodbc's type code for it (MariaDB's ODBC driver drops the sign)
        (mysql.SET, None, _as_text),  # SQLAlchemy makes a Python set (no order, no text); the driver has 'a,b'
        (None, 16, _as_whole),  # BIT(n) in a query comes as bytes (b'\x01'); SQLAlchemy makes a table's an int
    ),
    "postgresql": (
        (postgresql.MONEY, 790, _as_numeric),  # money's OID, psycopg's type code
        # psycopg makes an interval a timedelta, counting a month as 30 days: '1 mon' is not '30 days'.
        (postgresql.INTERVAL, 1186, _as_text),
        # ipaddress objects spell '10.0.0.1' as '10.0.0.1/32', and so does a cast to text: abbrev() is the
        # inet's own output ('10.0.0.1', '10.0.0.1/8'); a cidr's text is its output ('10.0.0.0/8')
        (postgresql.INET, 869, _as_address),
        (postgresql.CIDR, 650, _as_text),
    ),
}
_RECAST["mariadb"] = _RECAST["mysql"]


def _recast(dialect: str, sql_type: Any) -> Recast | None:
    for sql, _code, kind in _RECAST.get(dialect, ()):
        if sql is not None and isinstance(sql_type, sql):
            return kind
    return None


def _recast_results(dialect: str, description: Sequence[Sequence[Any]] | None) -> dict[int, Recast]:
    """The result columns (by index) to recast, by the type the database says it sends."""
    kinds = {code: kind for _sql, code, kind in _RECAST.get(dialect, ()) if code is not None}
    if not kinds or not description:
        return {}
    return {i: kinds[d[1]] for i, d in enumerate(description) if len(d) > 1 and d[1] in kinds}


def _lenient(col: Any) -> ColumnElement[Any]:
    return type_coerce(col, _Lenient(col.type)).label(col.name)


def _python_type(sql_type: Any) -> type | None:
    try:
        kind = sql_type.python_type
    except NotImplementedError:
        return None
    return kind if isinstance(kind, type) else None


def _undecodable(exc: BaseException) -> bool:
    """Is this the driver failing on a value (not the database, the network or the statement)?"""
    if isinstance(exc, DataError):  # psycopg: timestamp too large (after year 10K), date out of range
        return True
    if isinstance(exc, DBAPIError):
        return "could not decode" in str(exc.orig).lower()  # sqlite3: TEXT that is not UTF-8
    return isinstance(exc, (ValueError, ArithmeticError))  # a driver's or SQLAlchemy's converter


def _error_text(exc: BaseException) -> str:
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    text = str(orig).strip().splitlines()[0] if str(orig).strip() else ""
    return f"{type(orig).__name__}: {text}" if text else type(orig).__name__


def _raw_column(col: Any, dialect: str) -> ColumnElement[Any]:
    """The column as its raw bytes or text, past the driver's converters."""
    if dialect == "sqlite":
        raw: ColumnElement[Any] = cast(col, LargeBinary)
    else:
        raw = cast(col, Text)
    return type_coerce(raw, NullType()).label(col.name)


def _guarded(chunks: Iterator[list[Any]], failed: list[BaseException]) -> Iterator[list[Any]]:
    """The chunks until one cannot be fetched because of a value: then the error goes in `failed`."""
    while True:
        try:
            rows = next(chunks)
        except StopIteration:
            return
        except Exception as exc:
            if not _undecodable(exc):
                raise
            failed.append(exc)
            return
        yield rows


def _chunks(fetch: Callable[[int], Sequence[Any]], batch_size: int, budget: int) -> Iterator[list[Any]]:
    """Rows in batches of `batch_size`, or fewer when they would hold more than about `budget` bytes.

    Each batch is sized by the width of the rows before it (the first by a probe of a few
    rows), and measured as it comes: peak memory follows the budget, not the row count.
    """
    width = 0  # bytes per row, as last measured
    probe = min(batch_size, 4)
    while True:
        want = batch_size if not width else max(1, min(batch_size, budget // width))
        rows = list(fetch(probe if not width else want))
        if not rows:
            return
        if not width and len(rows) == probe and probe < want:
            width = _width(rows)
            more = max(0, min(want, budget // width) - len(rows))
            if more:
                rows.extend(fetch(more))
        width = _width(rows)
        yield rows


def _width(rows: Sequence[Any]) -> int:
    """Bytes per row, from up to 32 rows spread over the batch: measuring every value would cost a tenth of a read."""
    sample = rows[:: max(1, len(rows) // 32)]
    return max(1, sum(map(getsizeof, chain.from_iterable(sample))) // len(sample) + 64)


def _same_key(a: Sequence[Any], b: Sequence[Any], slots: list[int]) -> bool:
    return all(a[s] == b[s] for s in slots)


def _key_group_start(rows: Sequence[Any], slots: list[int]) -> int:
    """Where the trailing run of rows sharing the last row's key starts."""
    cut = len(rows) - 1
    while cut > 0 and _same_key(rows[cut - 1], rows[-1], slots):
        cut -= 1
    return cut
