"""Which change-detection mode suits a legacy table, and why: the judgement behind `straw discover`.

- `timestamp` when a column looks like a change time: a date-time type, a name that
  says "changed" (CHANGED_AT, MODIFIED, LAST_UPDATE, MUTATIE…), no NULLs (rows with a
  NULL time are never read), and a single-column unique key for the tie-breaker. An
  index on it and a latest value near now make the case stronger; their absence is noted.
- `incrementing` when a single-column integer key only grows: it is the primary key or
  unique, and its maximum is at least the row count (a sequence; gaps only add to it).
  It sees new rows only, which the reason says.
- `snapshot` otherwise, with the size cost of listing the whole table each poll.

The key sweep for hard deletes (`deletes:`) is proposed with both watermark modes: the
entity key is then the table's unique key, so the sweep reads an index only.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, literal, select
from sqlalchemy import types as sqltypes
from sqlalchemy.engine import Connection

from adapters.db.catalog import ColumnInfo, TableInfo

# Names that say "when this row last changed", in the spellings legacy schemas use (English, German, Dutch…).
_CHANGE_NAME = re.compile(
    r"chang|modif|updat|mtime|last_?(?:mod|chg|upd|edit)|edited|mutat|mutdat|aender|änder|geaendert|gewijzigd|"
    r"^(?:ts|timestamp|lastmod|upd_?dt|chg_?dt|mod_?dt)$",
    re.I,
)
_RECENT = dt.timedelta(days=31)
# Databases whose `settle: auto` knows which ids are still being written (adapters/db/settle.py); on the
# others an id gap is waited for, in case a late commit fills it.
_LEDGER = ("postgresql", "mysql", "mariadb", "sqlite")


@dataclass(frozen=True)
class Proposal:
    mode: str  # incrementing | timestamp | snapshot
    key: Sequence[str]  # the entity key's columns
    reasons: Sequence[str]  # why this mode, and what was weighed against it
    incrementing_column: str | None = None
    timestamp_column: str | None = None
    key_column: str | None = None
    sweep: bool = False  # propose `deletes: {sweep_interval: …}`
    notes: Sequence[str] = field(default_factory=tuple)


def propose(conn: Connection, table: TableInfo, now: dt.datetime | None = None) -> Proposal:
    unique = unique_key(table)
    single = unique[0] if unique is not None and len(unique) == 1 else None
    reasons: list[str] = []
    stamp = _timestamp_column(conn, table, single, now or dt.datetime.now(dt.UTC), reasons)
    if stamp is not None and single is not None:
        return Proposal("timestamp", [single], reasons, timestamp_column=stamp, key_column=single, sweep=True)
    growing = _growing_key(conn, table, single, reasons) if single is not None else False
    if growing and single is not None:
        return Proposal("incrementing", [single], reasons, incrementing_column=single, sweep=True)
    if unique is None:
        key = [c.name for c in table.columns if not c.nullable] or [c.name for c in table.columns]
        reasons.append(
            "no primary key or unique index: the key is every NOT NULL column, so a changed row is a delete "
            "and an insert; make the columns that identify a row the entity key if you know them"
            if len(key) < len(table.columns) or all(not c.nullable for c in table.columns) else
            "no primary key, no unique index and no NOT NULL column: the key is every column"
        )
    else:
        key = list(unique)
        if len(unique) > 1:
            reasons.append(f"composite key ({', '.join(unique)}): timestamp and incrementing need one key column")
    size = f"{table.rows:,} rows" if table.rows is not None else "its rows"
    reasons.append(f"snapshot: each poll lists all {size} and compares them with the last listing")
    return Proposal("snapshot", key, reasons)


def unique_key(table: TableInfo) -> Sequence[str] | None:
    """The primary key, else the shortest unique index whose columns are all NOT NULL (a NULL is no key)."""
    if table.primary_key:
        return table.primary_key
    for columns in sorted(table.unique, key=len):
        if all(not table.column(c).nullable for c in columns):
            return columns
    return None


def is_change_time(column: ColumnInfo) -> bool:
    return isinstance(column.type, sqltypes.DateTime) and _CHANGE_NAME.search(column.name) is not None


def _timestamp_column(
    conn: Connection, table: TableInfo, key: str | None, now: dt.datetime, reasons: list[str]
) -> str | None:
    candidates = [c for c in table.columns if is_change_time(c)]
    # Indexed first: a poll's range scan on it is cheap.
    for column in sorted(candidates, key=lambda c: c.name not in table.indexed):
        relation = table.relation
        col = relation.c[column.name]
        if column.nullable and conn.execute(select(literal(1)).select_from(relation).where(col.is_(None))
                                            .limit(1)).first() is not None:
            reasons.append(f"{column.name} looks like a change time but holds NULLs, and such rows are never "
                           "read in timestamp mode")
            continue
        if key is None:
            reasons.append(f"{column.name} looks like a change time, but timestamp mode needs a one-column "
                           "unique key as its tie-breaker and the table has none")
            return None
        latest = conn.execute(select(func.max(col)).select_from(relation)).scalar()
        why = [f"{column.name} is a {column.sql} named like a change time"]
        why.append("indexed" if column.name in table.indexed else
                   "NOT indexed: each poll scans the table; ask for an index on it")
        why.append(_recency(latest, now))
        reasons.append("timestamp: " + ", ".join(why) + f"; {key} breaks ties")
        return column.name
    return None


def _recency(latest: Any, now: dt.datetime) -> str:
    if latest is None:
        return "empty so far"
    if isinstance(latest, str):  # SQLite keeps timestamps as text
        try:
            latest = dt.datetime.fromisoformat(latest)
        except ValueError:
            return f"latest value {latest!r}"
    if not isinstance(latest, dt.datetime):
        return f"latest value {latest!r}"
    aware = latest if latest.tzinfo else latest.replace(tzinfo=dt.UTC)  # the zone is unknown: a day either way
    age = now - aware
    if age > _RECENT:
        return f"latest change {age.days} days ago (a table nobody writes any more?)"
    return f"latest change {latest:%Y-%m-%d %H:%M}"


def _growing_key(conn: Connection, table: TableInfo, key: str, reasons: list[str]) -> bool:
    column = table.column(key)
    if not isinstance(column.type, sqltypes.Integer) and not (
        isinstance(column.type, sqltypes.Numeric) and not isinstance(column.type, sqltypes.Float)
        and column.type.scale == 0
    ):
        reasons.append(f"key {key} is a {column.sql}, not an integer that could only grow")
        return False
    col = table.relation.c[key]
    low, high = conn.execute(select(func.min(col), func.max(col)).select_from(table.relation)).one()
    rows = table.rows or 0
    if high is None:
        reasons.append(f"incrementing: {key} is an integer {'primary' if table.primary_key else 'unique'} key"
                       + (", auto-incremented" if column.autoincrement else "")
                       + "; the table is empty, so only its type says so; sees new rows only, not updates")
        return True
    if int(high) < rows or int(low) < 0:
        reasons.append(f"{key} is an integer key, but its values ({low}..{high}) are not a growing sequence "
                       f"over {rows:,} rows")
        return False
    missing = int(high) - int(low) + 1 - rows
    if missing > 0 and conn.dialect.name not in _LEDGER:
        reasons.append(
            f"{missing:,} ids are missing between {low} and {high}: without a transaction ledger on this database "
            "each gap holds the rows above it for `settle_fallback` (30s) when first seen, so a first "
            "`run --once` may stop at one; the next run goes on"
        )
    reasons.append(
        f"incrementing: {key} is an integer {'primary' if table.primary_key else 'unique'} key, max {high} "
        f">= {rows:,} rows, so ids are handed out in order; sees new rows only: if rows are updated in place, "
        "use snapshot (or a change-time column)"
    )
    return True
