"""The entity field type for a SQL column type, as `straw discover` drafts it.

Exact where the database is: NUMERIC(p,s) is a `decimal` with scale s (a whole
NUMERIC(p,0) an `integer`), DATE stays a `date` and DATETIME/TIMESTAMP a
`datetime`, byte columns are `bytes` (base64 in the event); a MySQL TIME, a PostgreSQL
INTERVAL, INET or UUID a `string` (read as the database spells it). A type straw's
coercion has no rule for (arrays, ranges, geometry…) is left out of the draft, with a comment:
a field that turned every row into a dead letter would make a poor first run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import types as sqltypes
from sqlalchemy.dialects import mysql, postgresql
from sqlalchemy.types import TypeEngine

from straw.config import FieldType


@dataclass(frozen=True)
class DraftField:
    type: FieldType | None  # None: no type straw maps; left out of the entity
    scale: int | None = None
    char: bool = False  # CHAR(n): padded with blanks, so the source trims them
    binary: bool = False


def field_for(sql: TypeEngine[Any]) -> DraftField:
    # Order matters: Boolean before Integer (some dialects derive one from the other), Float before Numeric.
    if isinstance(sql, sqltypes.Boolean):
        return DraftField(FieldType.BOOLEAN)
    if isinstance(sql, mysql.BIT):  # read as a number (a table's by SQLAlchemy, a query's as `+ 0`)
        return DraftField(FieldType.BOOLEAN if sql.length == 1 else FieldType.INTEGER)
    if isinstance(sql, mysql.YEAR):
        return DraftField(FieldType.INTEGER)
    if isinstance(sql, postgresql.MONEY):  # read as a numeric: its digits as the database keeps them
        return DraftField(FieldType.DECIMAL)
    if isinstance(sql, (postgresql.INTERVAL, postgresql.INET, postgresql.CIDR, sqltypes.Uuid)):
        return DraftField(FieldType.STRING)  # the database's own text (a UUID's canonical form)
    if isinstance(sql, sqltypes.Integer):
        return DraftField(FieldType.INTEGER)
    if isinstance(sql, sqltypes.Float):
        return DraftField(FieldType.DECIMAL)  # the float's shortest repr, as text: no binary noise added
    if isinstance(sql, sqltypes.Numeric):
        if sql.scale == 0:
            return DraftField(FieldType.INTEGER)
        return DraftField(FieldType.DECIMAL, scale=sql.scale)
    if isinstance(sql, sqltypes.DateTime):
        return DraftField(FieldType.DATETIME)
    if isinstance(sql, sqltypes.Date):
        return DraftField(FieldType.DATE)
    if isinstance(sql, sqltypes.Time):
        return DraftField(FieldType.STRING)
    if isinstance(sql, sqltypes.JSON):
        return DraftField(FieldType.JSON)
    if isinstance(sql, sqltypes.Enum):
        return DraftField(FieldType.STRING)
    if isinstance(sql, sqltypes.String):
        return DraftField(FieldType.STRING, char=isinstance(sql, sqltypes.CHAR))
    if isinstance(sql, sqltypes._Binary):
        return DraftField(FieldType.BYTES, binary=True)
    return DraftField(None)
