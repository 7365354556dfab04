"""Target column types from an entity's field types, exact on every dialect.

Decimals stay exact (NUMERIC with the declared scale; TEXT on SQLite, whose NUMERIC is a float), datetimes
are instants (timestamptz on PostgreSQL; UTC with microseconds where the dialect has no zoned type). On
MySQL/MariaDB text is utf8mb4 compared byte for byte, and long (LONGTEXT, LONGBLOB: a TEXT holds 64 KB).
"""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Date, DateTime, LargeBinary, Numeric, String, Text
from sqlalchemy.dialects import mysql, postgresql
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator, TypeEngine

from straw.config import FieldSpec, FieldType

DEFAULT_SCALE = 10  # a decimal field without `scale`: NUMERIC(38, 10)
KEY_TEXT = 255  # a text key field must be indexable on every dialect (MariaDB refuses TEXT keys)


class ExactDecimal(TypeDecorator[Decimal]):
    """NUMERIC(38, scale); text on SQLite, where NUMERIC would round through a float."""

    impl = Numeric
    cache_ok = True

    def __init__(self, scale: int) -> None:
        super().__init__(precision=38, scale=scale, asdecimal=True)
        self.scale = scale

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(String(60))
        return dialect.type_descriptor(Numeric(38, self.scale, asdecimal=True))

    def process_bind_param(self, value: Decimal | None, dialect: Dialect) -> Any:
        if value is not None and dialect.name == "sqlite":
            return format(value, "f")
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        return None if value is None else Decimal(str(value)) if not isinstance(value, Decimal) else value


class Instant(TypeDecorator[dt.datetime]):
    """A point in time: timestamptz on PostgreSQL, else UTC with microseconds (read back as aware UTC)."""

    impl = DateTime
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(postgresql.TIMESTAMP(timezone=True))
        if dialect.name in ("mysql", "mariadb"):
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(DateTime())

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> Any:
        if value is None or dialect.name == "postgresql":
            return value
        return value.astimezone(dt.UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if not isinstance(value, dt.datetime):
            return None
        return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


MYSQL = ("mysql", "mariadb")


def binary_collation(dialect: Dialect) -> str:
    """The utf8mb4 collation that compares bytes and pads nothing: keys that differ in case, accents or
    trailing blanks stay two keys (under the usual default, utf8mb4_general_ci, 'new', 'NEW' and 'new '
    were one row). MySQL 5.7 has none without padding: there 'new' and 'new ' are still one."""
    version = tuple(v for v in (dialect.server_version_info or ()) if isinstance(v, int))
    if getattr(dialect, "is_mariadb", False):
        return "utf8mb4_nopad_bin" if version >= (10, 2) else "utf8mb4_bin"
    return "utf8mb4_0900_bin" if version >= (8, 0, 17) else "utf8mb4_bin"


def table_options(dialect: Dialect) -> dict[str, str]:
    """CREATE TABLE options: on MySQL/MariaDB utf8mb4 (in a database created latin1 a '😀' became '?')
    with `binary_collation`."""
    if dialect.name not in MYSQL:
        return {}
    return {f"{dialect.name}_charset": "utf8mb4", f"{dialect.name}_collate": binary_collation(dialect)}


class JsonText(TypeDecorator[Any]):
    """JSON as TEXT, for SQLite: a column declared JSON has NUMERIC affinity there, which stores a document
    that is a number as a number (9223372036854775808 became 9.223372036854776e+18, 1.0 became 1)."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        return None if value is None else json.dumps(value, ensure_ascii=False, separators=(",", ":"))

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        return None if value is None else json.loads(value)


def column_type(spec: FieldSpec, *, key: bool) -> TypeEngine[Any]:
    match spec.type:
        case FieldType.STRING:
            return String(KEY_TEXT) if key else Text().with_variant(mysql.LONGTEXT(), *MYSQL)
        case FieldType.INTEGER:
            return BigInteger()
        case FieldType.DECIMAL:
            return ExactDecimal(DEFAULT_SCALE if spec.scale is None else spec.scale)
        case FieldType.BOOLEAN:
            return Boolean()
        case FieldType.DATE:
            return Date()
        case FieldType.DATETIME:
            return Instant()
        case FieldType.JSON:
            return (JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")
                    .with_variant(JsonText(), "sqlite"))
        case FieldType.BYTES:
            return LargeBinary().with_variant(mysql.LONGBLOB(), *MYSQL)
