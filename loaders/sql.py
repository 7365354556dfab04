"""The SQL loader: apply records to tables named for their entities, exactly once, in stream order per key.

One transaction per batch holds the changes, each key's version (`straw_versions`) and the stream's last
applied `seq` (`straw_applied`). A batch first takes its streams' rows in `straw_applied` for update, so two
loaders of one group apply one after the other; each key's version then decides: a change at or below the
version of its key is a redelivery or is superseded, and is skipped. Within a batch only the last change of a
key is applied (upsert or delete, whichever came last): stream order per key, never "upserts, then deletes".
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from decimal import Context, Decimal, InvalidOperation
from functools import partial
from hashlib import blake2b
from typing import Any

from sqlalchemy import MetaData, Table, case, create_engine, delete, event, select, tuple_, update
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.dml import Insert

from loaders.records import Record
from loaders.sdk import Failed, TargetDown
from loaders.sql_postgres import PgApply, move_applied
from loaders.sql_schema import SchemaError, binary_keys, bookkeeping, ensure_table, entity_table
from loaders.sql_types import DEFAULT_SCALE, MYSQL, table_options
from straw.config import EntitySpec, FieldType
from straw.config_loaders import SqlLoaderSpec
from straw.records import DELETED
from straw.redact import describe

_LOOKUP_CHUNK = 1000
_QUANTUM = Decimal(1).scaleb(-DEFAULT_SCALE)
_UPSERTS = ("postgresql", "sqlite", "mysql", "mariadb")
_TRANSIENT_SQLSTATES = ("40001", "40P01", "57P01", "57P02", "57P03", "53300", "55P03")
_TRANSIENT_MYSQL = (1040, 1053, 1205, 1213, 2003, 2006, 2013)


def key_hash(subject: str) -> str:
    return blake2b(subject.encode(), digest_size=16).hexdigest()


def transient(exc: BaseException) -> bool:
    """A lost connection, a deadlock or a lock timeout: the batch is fine, the moment was not."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    orig = getattr(exc, "orig", None)
    state = getattr(orig, "sqlstate", None)
    if isinstance(state, str) and (state.startswith("08") or state in _TRANSIENT_SQLSTATES):
        return True
    args = getattr(orig, "args", ())
    if args and isinstance(args[0], int) and args[0] in _TRANSIENT_MYSQL:
        return True
    return "database is locked" in str(orig)


def upsert_statement(dialect: str, table: Table, key: Sequence[str]) -> Insert:
    """The dialect's native upsert of whole rows by key, for executemany."""
    others = [c.name for c in table.c if c.name not in key]
    if dialect in ("postgresql", "sqlite"):
        stmt = postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)
        if not others:
            return stmt.on_conflict_do_nothing(index_elements=list(key))
        return stmt.on_conflict_do_update(index_elements=list(key), set_={c: stmt.excluded[c] for c in others})
    mstmt = mysql.insert(table)
    return mstmt.on_duplicate_key_update({c: mstmt.inserted[c] for c in (others or list(key)[:1])})


class SqlLoader:
    def __init__(self, spec: SqlLoaderSpec, entities: Mapping[str, EntitySpec], engine: Engine | None = None) -> None:
        self.spec = spec
        self.entities = entities
        # No pre-ping: a dropped connection fails the batch as "target down" and the pool replaces it.
        self.engine = engine or create_engine(spec.url)
        self.dialect = self.engine.dialect.name
        self.metadata = MetaData()
        self.applied, self.versions = bookkeeping(self.metadata, spec.db_schema)
        self._tables: dict[str, Table] = {}
        self._upserts: dict[str, Insert] = {}
        self._pg: dict[str, PgApply] = {}
        if self.dialect not in _UPSERTS:
            raise SchemaError(
                f"the {self.dialect} dialect has no upsert in straw's SQL loader (PostgreSQL, MariaDB/MySQL and "
                "SQLite do); for SQL Server see README 'SQL loader' (MERGE)")
        self._ready = False
        self._known_streams: set[str] = set()
        # Decimal fields without a `scale` (NUMERIC(38, 10)), per entity; SQLite keeps decimals as exact text.
        self._loose = {name: fields for name, entity in entities.items() if self.dialect != "sqlite" and (fields := [
            f for f, spec in entity.fields.items() if spec.type is FieldType.DECIMAL and spec.scale is None])}
        if self.dialect in MYSQL:
            event.listen(self.engine, "connect", _strict_session)

    def close(self) -> None:
        self.engine.dispose()

    def apply(self, records: Sequence[Record]) -> list[Failed]:
        """Apply the batch in one transaction; if it fails, each record alone, to find the ones that fail."""
        if self._loose:
            rounded = [Failed(r, why) for r in records if (why := self._rounded(r))]
            if rounded:
                bad = {id(f.record) for f in rounded}
                kept = [r for r in records if id(r) not in bad]
                return rounded + (self._apply_or_find(kept) if kept else [])
        return self._apply_or_find(records)

    def _rounded(self, record: Record) -> str | None:
        """Why a decimal of a field without a declared `scale` cannot be stored as it is, or None. Its column
        is NUMERIC(38, 10), which would round 0.00000000001 to 0 without a word (a declared scale is a
        rounding asked for; an undeclared one is not)."""
        for field in self._loose.get(record.entity, ()):
            value = record.data.get(field)
            if not isinstance(value, Decimal) or not value.is_finite():
                continue
            exponent = value.as_tuple().exponent
            if not isinstance(exponent, int) or exponent >= -DEFAULT_SCALE:
                continue
            try:  # enough digits that quantizing never fails on precision: it tells "changes" from "does not"
                rounded = value.quantize(_QUANTUM, context=Context(prec=max(28, value.adjusted() + DEFAULT_SCALE + 2)))
            except InvalidOperation:
                continue  # beyond NUMERIC(38, 10) altogether: the database refuses it (a dead letter too)
            if rounded != value:
                return (f"field {field!r}: {value:f} has more than {DEFAULT_SCALE} decimal places, which its column "
                        f"(NUMERIC(38, {DEFAULT_SCALE}): the entity declares no scale) would round away; declare "
                        "the field's `scale` (the rounding wanted), or load into a table whose column holds them")
        return None

    def _apply_or_find(self, records: Sequence[Record]) -> list[Failed]:
        try:
            self._apply(records)
            return []
        except (TargetDown, SchemaError):
            raise
        except Exception as exc:
            if transient(exc):
                raise TargetDown(describe(exc)) from exc
            if len(records) == 1:
                return [Failed(records[0], describe(exc))]
        failed = []
        for record in records:
            try:
                self._apply([record])
            except (TargetDown, SchemaError):
                raise
            except Exception as exc:
                if transient(exc):
                    raise TargetDown(describe(exc)) from exc
                failed.append(Failed(record, describe(exc)))
        return failed

    def _connect(self) -> Connection:
        try:
            return self.engine.connect()
        except Exception as exc:  # down, refusing, wrong password: none of it is the records' fault
            raise TargetDown(describe(exc)) from exc

    @property
    def _what(self) -> str:
        return f"loader {self.spec.name}"

    def _prepare(self, conn: Connection, entities: set[str]) -> None:
        """DDL in its own transactions: MariaDB commits implicitly around DDL."""
        options = table_options(conn.dialect)
        if not self._ready:  # the entities `tables` names are checked at start, before any record needs them
            for kept in (self.applied, self.versions):
                kept.dialect_kwargs.update(options)
            _ddl(conn, partial(self._bookkeeping, conn))
            entities = entities | {e for e in self.spec.tables if e in self.entities}
            self._ready = True
        for name in sorted(entities - set(self._tables)):
            entity = self.entities[name]
            table = entity_table(MetaData(), self.spec.table_of(name), entity, self.spec.db_schema, **options)
            _ddl(conn, partial(ensure_table, conn, table, entity, self.spec.create_tables, self._what))
            self._tables[name] = table

    def _bookkeeping(self, conn: Connection) -> None:
        self.metadata.create_all(conn, tables=[self.applied, self.versions])
        binary_keys(conn, self.applied, ["stream"], self._what)  # streams 'Orders' and 'orders' are two
        binary_keys(conn, self.versions, ["stream", "entity", "key_hash"], self._what)

    def _upsert(self, conn: Connection, table: Table, key: Sequence[str], rows: list[dict[str, Any]]) -> None:
        statement = self._upserts.get(table.name)
        if statement is None:
            statement = self._upserts[table.name] = upsert_statement(self.dialect, table, key)
        conn.execute(statement, rows)  # executemany: PyMySQL sends it as multi-row INSERTs; SQLite is in process

    def _lock(self, conn: Connection, stream: str) -> None:
        if stream not in self._known_streams:
            exists = conn.execute(select(self.applied.c.seq).where(self.applied.c.stream == stream)).first()
            if exists is None:
                _insert_ignore(conn, self.dialect, self.applied, {"stream": stream, "seq": 0})
        # A write first: the row lock orders this batch after any other loader's batch on this stream.
        conn.execute(update(self.applied).where(self.applied.c.stream == stream).values(seq=self.applied.c.seq))

    def _apply(self, records: Sequence[Record]) -> None:
        with self._connect() as conn:
            self._prepare(conn, {r.entity for r in records})
            if self.dialect == "postgresql":
                with conn.begin():
                    self._apply_pg(conn, records)
                return
            with conn.begin():
                streams = sorted({r.stream for r in records})
                for stream in streams:
                    self._lock(conn, stream)
                latest: dict[tuple[str, str, str], Record] = {}
                for record in sorted(records, key=lambda r: (r.stream, r.seq)):
                    latest[(record.stream, record.entity, key_hash(record.subject))] = record
                versions = self._versions_of(conn, list(latest))
                fresh = [r for k, r in latest.items() if r.seq > versions.get(k, 0)]
                self._write(conn, fresh)
                if fresh:
                    self._upsert(conn, self.versions, ["stream", "entity", "key_hash"], [
                        {"stream": k[0], "entity": k[1], "key_hash": k[2], "seq": r.seq, "deleted": r.op == DELETED}
                        for k, r in latest.items() if r.seq > versions.get(k, 0)
                    ])
                for stream in streams:
                    top = max(r.seq for r in records if r.stream == stream)
                    seq = self.applied.c.seq
                    conn.execute(update(self.applied).where(self.applied.c.stream == stream)
                                 .values(seq=_greatest(seq, top)))
            # Known once committed: a batch that rolled back took its new `straw_applied` row with it.
            self._known_streams.update(streams)

    def _apply_pg(self, conn: Connection, records: Sequence[Record]) -> None:
        """PostgreSQL: one statement per stream (lock and move `straw_applied`), then one per entity."""
        tops: dict[str, int] = {}
        latest: dict[tuple[str, str, str], Record] = {}
        for record in records:  # the last change of each key, in stream order (a batch may hold retries)
            stream, seq = record.stream, record.seq
            if seq > tops.get(stream, 0):
                tops[stream] = seq
            # key_hash inline: this loop runs for every record, and a call is a fifth of the hash's cost
            slot = (stream, record.entity, blake2b(record.subject.encode(), digest_size=16).hexdigest())
            known = latest.get(slot)
            if known is None or known.seq < seq:
                latest[slot] = record
        for stream in sorted(tops):  # always in one order: two loaders on two streams never deadlock
            move_applied(conn, self.applied, stream, tops[stream])
        by_entity: dict[str, list[tuple[str, str, int, bool, dict[str, Any]]]] = {}
        for (stream, entity, hashed), record in latest.items():
            by_entity.setdefault(entity, []).append((stream, hashed, record.seq, record.op == DELETED, record.data))
        for entity, rows in by_entity.items():
            statement = self._pg.get(entity)
            if statement is None:
                statement = self._pg[entity] = PgApply(
                    conn, self._tables[entity], self.entities[entity].key, self.versions, entity)
            statement.run(conn, rows)

    def _versions_of(self, conn: Connection, keys: list[tuple[str, str, str]]) -> dict[tuple[str, str, str], int]:
        found: dict[tuple[str, str, str], int] = {}
        groups: dict[tuple[str, str], list[str]] = {}
        for stream, entity, hashed in keys:
            groups.setdefault((stream, entity), []).append(hashed)
        v = self.versions.c
        for (stream, entity), hashes in groups.items():
            for chunk in _chunks(hashes, _LOOKUP_CHUNK):
                rows = conn.execute(select(v.key_hash, v.seq).where(
                    v.stream == stream, v.entity == entity, v.key_hash.in_(chunk)))
                found.update({(stream, entity, h): int(s) for h, s in rows})
        return found

    def _write(self, conn: Connection, fresh: list[Record]) -> None:
        by_entity: dict[str, list[Record]] = {}
        for record in fresh:
            by_entity.setdefault(record.entity, []).append(record)
        for name, records in by_entity.items():
            entity = self.entities[name]
            table = self._tables[name]
            rows = [{f: r.data.get(f) for f in entity.fields} for r in records if r.op != DELETED]
            if rows:
                self._upsert(conn, table, entity.key, rows)
            gone = [tuple(r.data.get(k) for k in entity.key) for r in records if r.op == DELETED]
            columns = [table.c[k] for k in entity.key]
            for start in range(0, len(gone), _LOOKUP_CHUNK):  # one statement per chunk, not one per key
                chunk = gone[start:start + _LOOKUP_CHUNK]
                where = columns[0].in_([g[0] for g in chunk]) if len(columns) == 1 else tuple_(*columns).in_(chunk)
                conn.execute(delete(table).where(where))


def _strict_session(dbapi_connection: Any, _record: Any) -> None:
    """A server (or a legacy my.cnf) without strict mode stores what does not fit silently changed: '😀' in a
    latin1 column as '?', 70,000 characters in a TEXT cut to 65,535. Strict, the write fails: a dead letter
    that says why. The server's other modes (ANSI_QUOTES, which SQLAlchemy has already seen) are kept."""
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("SET SESSION sql_mode = TRIM(BOTH ',' FROM CONCAT(@@SESSION.sql_mode, ',STRICT_ALL_TABLES'))")
    finally:
        cursor.close()


def _greatest(column: Any, value: int) -> Any:
    return case((column < value, value), else_=column)


def _insert_ignore(conn: Connection, dialect: str, table: Table, row: dict[str, Any]) -> None:
    if dialect in ("mysql", "mariadb"):
        conn.execute(table.insert().prefix_with("IGNORE"), row)
    elif dialect in ("postgresql", "sqlite"):
        stmt = postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)
        conn.execute(stmt.on_conflict_do_nothing(), row)
    else:
        conn.execute(table.insert(), row)


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _ddl(conn: Connection, create: Callable[[], None]) -> None:
    """Run `create` in a transaction of its own, once more if it failed: two loaders starting together both
    see a table missing and both create it, and the loser's CREATE fails on the catalog (PostgreSQL:
    UniqueViolation on pg_type). The second try sees the table; a batch no longer waits `claim_idle` for it."""
    try:
        with conn.begin():
            create()
    except SchemaError:
        raise
    except Exception:
        with conn.begin():
            create()
