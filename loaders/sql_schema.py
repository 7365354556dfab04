"""Target tables from entity schemas: created when missing, a new field added as a nullable column, and a
removed or retyped field an error that names the table, the column and the fix."""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Date,
    DateTime,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    String,
    Table,
    Text,
    inspect,
    text,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Connection
from sqlalchemy.schema import CreateColumn
from sqlalchemy.types import TypeEngine

from loaders.sql_types import MYSQL, ExactDecimal, Instant, binary_collation, column_type
from straw.config import EntitySpec, FieldType

STREAM_TEXT = 200
APPLIED = "straw_applied"
VERSIONS = "straw_versions"


class SchemaError(Exception):
    """The target's tables do not fit the entities: the loader stops (exit 2); the message says the fix."""


def entity_table(metadata: MetaData, name: str, entity: EntitySpec, schema: str | None, **options: str) -> Table:
    """`options`: the dialect's CREATE TABLE options (`sql_types.table_options`)."""
    table = Table(
        name, metadata,
        *(Column(field, column_type(spec, key=field in entity.key), primary_key=field in entity.key,
                 nullable=field not in entity.key, autoincrement=False)
          for field, spec in entity.fields.items()),
        schema=schema,
    )
    table.dialect_kwargs.update(options)
    return table


def bookkeeping(metadata: MetaData, schema: str | None) -> tuple[Table, Table]:
    """`straw_applied`: the last applied `seq` per stream; `straw_versions`: the `seq` of the last change
    applied to each key (and whether it deleted it), so an older version never overwrites a newer one."""
    applied = Table(
        APPLIED, metadata,
        Column("stream", String(STREAM_TEXT), primary_key=True),
        Column("seq", BigInteger, nullable=False),
        schema=schema,
    )
    versions = Table(
        VERSIONS, metadata,
        Column("stream", String(STREAM_TEXT), primary_key=True),
        Column("entity", String(100), primary_key=True),
        Column("key_hash", String(32), primary_key=True),
        Column("seq", BigInteger, nullable=False),
        Column("deleted", Boolean, nullable=False),
        schema=schema,
    )
    return applied, versions


# What each field type may look like when the database reflects it back.
_REFLECTED: dict[FieldType, tuple[type[TypeEngine[Any]], ...]] = {
    FieldType.STRING: (String, Text),
    FieldType.INTEGER: (Integer,),
    FieldType.DECIMAL: (Numeric,),
    FieldType.BOOLEAN: (Boolean, Integer),  # MariaDB's BOOLEAN is TINYINT(1)
    FieldType.DATE: (Date,),
    FieldType.DATETIME: (DateTime,),
    FieldType.JSON: (JSON, Text),  # MariaDB's JSON is LONGTEXT
    FieldType.BYTES: (LargeBinary, mysql.LONGBLOB, mysql.MEDIUMBLOB, mysql.TINYBLOB),
}


def _fits(field_type: FieldType, reflected: TypeEngine[Any], wanted: TypeEngine[Any], dialect: str) -> str | None:
    """Why a reflected column cannot hold the field, or None."""
    if field_type is FieldType.DECIMAL and dialect == "sqlite":
        ok = isinstance(reflected, (String, Numeric))
    elif field_type is FieldType.DATETIME and dialect == "sqlite":
        ok = isinstance(reflected, (DateTime, String))
    elif field_type is FieldType.DECIMAL and isinstance(reflected, Integer):
        ok = False
    else:
        ok = isinstance(reflected, _REFLECTED[field_type])
    if not ok:
        return f"is {reflected} but the field is {field_type.value}"
    if isinstance(wanted, ExactDecimal) and isinstance(reflected, Numeric) and dialect != "sqlite" \
            and reflected.scale is not None and reflected.scale != wanted.scale:
        return f"has scale {reflected.scale} but the field has scale {wanted.scale}"
    if isinstance(wanted, Instant) and dialect == "postgresql" and not getattr(reflected, "timezone", True):
        return "is a timestamp without time zone but the field is an instant (timestamptz)"
    return None


def ensure_table(conn: Connection, table: Table, entity: EntitySpec, create: bool, what: str) -> None:
    """Create `table` or fit it to `entity`; raise SchemaError naming the table, the column and the fix."""
    inspector = inspect(conn)
    name = f"{table.schema}.{table.name}" if table.schema else table.name
    if not inspector.has_table(table.name, schema=table.schema):
        if not create:
            raise SchemaError(f"{what}: table {name} does not exist; create it, or set create_tables: true")
        table.create(conn)
        return
    existing = {c["name"].lower(): c for c in inspector.get_columns(table.name, schema=table.schema)}
    declared = {f.lower(): f for f in entity.fields}
    for column_name in existing:
        if column_name not in declared:
            raise SchemaError(
                f"{what}: table {name} has column {existing[column_name]['name']}, which the entity no longer "
                f"declares (a removed field); declare the field again, or drop the column "
                f"(ALTER TABLE {name} DROP COLUMN {existing[column_name]['name']})")
    dialect = conn.dialect.name
    for lowered, field in declared.items():
        column = table.c[field]
        found = existing.get(lowered)
        if found is None:
            if not create:
                raise SchemaError(f"{what}: table {name} has no column {field} (a new field); add it as a "
                                  "nullable column, or set create_tables: true")
            if field in entity.key:
                raise SchemaError(f"{what}: table {name}: key field {field} is new; a key cannot be added to a "
                                  "table with rows: load into a new table (`tables:`)")
            ddl = CreateColumn(Column(field, column.type, nullable=True)).compile(dialect=conn.dialect)
            conn.exec_driver_sql(f"ALTER TABLE {conn.dialect.identifier_preparer.format_table(table)} ADD {ddl}")
            continue
        problem = _fits(entity.fields[field].type, found["type"], column.type, dialect)
        if problem:
            raise SchemaError(
                f"{what}: table {name} column {found['name']} {problem} (a retyped field); change the column "
                f"(ALTER TABLE {name} ...) or load the entity into a new table (`tables:`)")
    text_keys = [existing[f.lower()]["name"] for f in entity.key if entity.fields[f].type is FieldType.STRING]
    binary_keys(conn, table, text_keys, what)


def binary_keys(conn: Connection, table: Table, columns: list[str], what: str) -> None:
    """On MySQL/MariaDB, refuse text key columns whose collation folds case, accents or blanks: there two
    keys that differ only so ('new', 'NEW', 'new ') would update one row, each overwriting the other."""
    if conn.dialect.name not in MYSQL or not columns:
        return
    found = conn.execute(
        text("SELECT COLUMN_NAME, COLLATION_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = "
             "COALESCE(:schema, DATABASE()) AND TABLE_NAME = :table"),
        {"schema": table.schema, "table": table.name},
    ).all()
    collations = {str(n).lower(): str(c or "") for n, c in found}
    wanted = binary_collation(conn.dialect)
    name = f"{table.schema}.{table.name}" if table.schema else table.name
    for column in columns:
        collation = collations.get(column.lower(), "")
        if collation.endswith("_bin") and (collation == wanted or "nopad" in collation or "0900" in collation):
            continue
        if collation == "binary" or (collation.endswith("_bin") and wanted == "utf8mb4_bin"):
            continue
        raise SchemaError(
            f"{what}: table {name} key column {column} has collation {collation or 'none'}, under which keys "
            f"that differ in case, accents or trailing blanks are one key (each would overwrite the other's "
            f"row); change it: ALTER TABLE {name} MODIFY {column} VARCHAR(255) CHARACTER SET utf8mb4 COLLATE "
            f"{wanted} NOT NULL")
