"""Per-row digests computed by the legacy database: a snapshot listing fetches keys and digests only.

A snapshot source lists every row each time; nearly all are unchanged. With a database
digest the listing reads `(key…, digest)` per row, the outbox compares the digests with
the stored ones, and only new and changed keys are read in full (see `DbSource`'s
digest listing in `poller.py`). What the digest must never do:

- make two different rows equal: each column is encoded so that the encoding of a row
  can be parsed back (PostgreSQL's row text quotes and escapes each field and leaves
  NULL empty, `""` for an empty string; MariaDB/MySQL get `N` for NULL and
  `V<byte length>:<bytes>` otherwise, the bytes cast to BINARY in the column's own
  character set, so no conversion or collation is involved). Floats are hashed by
  their exact value (PostgreSQL `float8send`, MariaDB's shortest round-trip text of
  the double: a FLOAT column is widened first, its own text keeps 6 digits only);
- make an unchanged row differ: the rendering of a value depends only on the value
  and the session's settings (time zone, DateStyle), which a long-running straw keeps.
  If they change, every row reads as changed once: it is read and mapped again, and
  its canonical data (`data_hash`) decides, so no event is sent for it.

Digests start with `KIND` (17 bytes), Python digests are 16 bytes (`straw/mapping.py`):
the two never compare equal, so a source switching between them reads every row once
and sends nothing for the unchanged ones. The salt (the mapping's shape and the
source's soft-delete rule) keys the digest the way the Python digest is keyed: a
changed mapping reads everything once.

md5 is not collision-resistant against someone crafting rows; the legacy data is
written by the legacy application, and a crafted pair would need both rows under one
key in turn. SQLite and unknown dialects keep the Python digest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    ColumnElement,
    FromClause,
    Table,
    bindparam,
    case,
    cast,
    func,
    literal,
    literal_column,
    tuple_,
    type_coerce,
)
from sqlalchemy.types import DOUBLE_PRECISION, Float, LargeBinary, String

from straw.source import DB_DIGEST as KIND

VERSION = "1"  # of the row encoding: a new one reads every row once
LABEL = "straw_digest"
DIALECTS = ("postgresql", "mysql", "mariadb")


@dataclass(frozen=True, slots=True)
class Choice:
    database: bool
    why: str


def choose(setting: str, dialect: str, relation: FromClause, key_columns: Sequence[str]) -> Choice:
    """Whether a snapshot source lists digests computed by the database, and why (for `straw check`).

    `auto` takes the database digest on PostgreSQL and MariaDB/MySQL for a table whose
    key columns are its primary key (or lead a unique index): the listing pages by key,
    one index range per page. A query, or a table without such an index, keeps the
    Python digest; `database` takes it anyway (each page then sorts the relation).
    """
    if setting == "python":
        return Choice(False, "python (configured)")
    if dialect not in DIALECTS:
        return Choice(False, f"python ({dialect} has no digest straw uses)")
    if setting == "database":
        return Choice(True, f"database (md5 on {dialect}, configured)")
    if not isinstance(relation, Table):
        return Choice(False, "python (a query: no key index known; `digest: database` to use the database's)")
    if not _unique_key(relation, key_columns):
        return Choice(False, "python (the key is not the table's primary key or a unique index)")
    return Choice(True, f"database (md5 on {dialect})")


def _unique_key(table: Table, key_columns: Sequence[str]) -> bool:
    wanted = {k.lower() for k in key_columns}
    pk = {c.name.lower() for c in table.primary_key.columns}
    if pk and pk <= wanted:
        return True
    return any(
        index.unique and {c.name.lower() for c in index.columns} <= wanted
        and not any(c.nullable for c in index.columns)
        for index in table.indexes
    )


def expression(dialect: str, columns: Sequence[ColumnElement[Any]]) -> ColumnElement[bytes]:
    """The digest of `columns` (the mapped and soft-delete columns), as `KIND` + 16 bytes; binds `straw_salt`.

    NULL only where the database cannot build the row's text (MariaDB: longer than
    `max_allowed_packet`): such a row is read in full each listing (see `mapping.py`).
    """
    salt = bindparam("straw_salt", type_=String())
    kind = literal(KIND, LargeBinary())
    if dialect == "postgresql":
        # row(...)::text quotes and escapes each field as needed and leaves NULL empty.
        row = cast(func.row(*(_pg_field(c) for c in columns)), String())
        digest: ColumnElement[Any] = kind.op("||")(func.decode(func.md5(salt.concat(row)), "hex"))
    else:
        digest = func.concat(kind, func.unhex(func.md5(func.concat(salt, *(_my_field(c) for c in columns)))))
    return type_coerce(digest, LargeBinary()).label(LABEL)


def _pg_field(col: ColumnElement[Any]) -> ColumnElement[Any]:
    if isinstance(col.type, Float):
        return func.float8send(cast(col, DOUBLE_PRECISION()))  # the exact value, whatever extra_float_digits says
    return col


def _my_field(col: ColumnElement[Any]) -> ColumnElement[Any]:
    value: ColumnElement[Any] = col
    if isinstance(col.type, Float):
        # A FLOAT's own text has 6 significant digits (two values could share it): as a DOUBLE, + 0e0, it is exact.
        value = col + literal_column("0e0")
    raw = cast(value, LargeBinary())  # CAST(x AS BINARY): the bytes as stored, in the column's character set
    return case(
        (col.is_(None), literal(b"N", LargeBinary())),
        else_=func.concat(literal(b"V", LargeBinary()), func.length(raw), literal(b":", LargeBinary()), raw),
    )


def key_in(keys: Sequence[ColumnElement[Any]], values: Sequence[Sequence[Any]]) -> ColumnElement[bool]:
    """`(key…) IN ((…), …)`: the rows of these keys."""
    if len(keys) == 1:
        return keys[0].in_([v[0] for v in values])
    return tuple_(*keys).in_([tuple(v) for v in values])
