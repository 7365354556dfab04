"""List a DB source's entity keys only, in key order: the legacy side of a key sweep.

`SELECT key… FROM relation [WHERE (key…) > (:after…)] ORDER BY key…`: with the key the
table's primary key (or any index on it) this is an index-only scan; rows stream from a
server-side cursor in batches, so memory stays flat whatever the table size. A listing
cut short resumes after the last key of a committed batch (`after`, compact JSON as the
snapshot positions are), compared in the database's own collation, as it sorted them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, Table, literal, select, tuple_
from sqlalchemy.types import NullType

from adapters.db import position

if TYPE_CHECKING:
    from adapters.db.poller import DbSource

BATCH = 10_000  # keys per batch (one outbox commit each): keys are small, commits are not


def list_keys(
    source: DbSource, key_columns: Sequence[str], after: str | None, batch: int = BATCH
) -> Iterator[tuple[Sequence[Sequence[Any]], str]]:
    """Batches of key rows (values in key order) after `after`, each with the position after it."""
    relation = source.relation()
    columns = _columns(source, key_columns)
    stmt = select(*columns).order_by(*columns)
    if after is not None:
        values = position.decode(after, tuple(_python_type(c) for c in columns))
        # A query's column types are unknown: bind untyped, so the database reads the value as the column's.
        bound = values if isinstance(relation, Table) else tuple(literal(v, NullType()) for v in values)
        stmt = stmt.where(columns[0] > bound[0] if len(columns) == 1 else tuple_(*columns) > tuple_(*bound))
    for col in columns:
        stmt = stmt.where(col.is_not(None))  # a row without a key was never delivered
    with source.connect() as conn:
        result = conn.execution_options(stream_results=True, yield_per=batch).execute(stmt, _params(source))
        for rows in result.partitions():
            yield rows, position.encode(tuple(rows[-1]))


def describe(source: DbSource, key_columns: Sequence[str]) -> str:
    """For `straw check`: the sweep's interval, after one key has been read (the key columns exist)."""
    deletes = source.spec.deletes
    if deletes is None:
        return ""
    columns = _columns(source, key_columns)
    with source.connect() as conn:
        conn.execute(select(*columns).limit(1), _params(source)).all()
    return f"; key sweep for hard deletes every {deletes.sweep_interval:g}s on {', '.join(c.name for c in columns)}"


def _columns(source: DbSource, key_columns: Sequence[str]) -> list[ColumnElement[Any]]:
    relation = source.relation()
    by_lower = {c.name.lower(): c.name for c in relation.c}
    return [relation.c[k if k in relation.c else by_lower.get(k.lower(), k)] for k in key_columns]


def _params(source: DbSource) -> dict[str, Any]:
    """The query's parameters; :last_value at its start, so the listing covers every row."""
    spec = source.spec
    params: dict[str, Any] = dict(spec.params)
    if spec.uses_last_value:
        params["last_value"] = spec.start_value
    return params


def _python_type(col: ColumnElement[Any]) -> type | None:
    try:
        kind = col.type.python_type
    except NotImplementedError:
        return None
    return kind if isinstance(kind, type) else None
