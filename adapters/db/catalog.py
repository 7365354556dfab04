"""What a legacy database holds: tables and views, their columns, keys, indexes and sizes.

Read through SQLAlchemy's inspector on a read-only engine (any URL straw polls,
`odbc:` included: straw's ODBC dialect reflects through the ODBC catalog
functions). Row counts are the database's own estimate where it keeps one
(PostgreSQL `pg_class.reltuples`, MariaDB/MySQL `information_schema.TABLES`),
counted exactly where it does not or where the estimate says the table is small.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Column, MetaData, Table, func, inspect, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.types import TypeEngine

# Below this estimate a table is counted exactly: cheap, and a fresh table's estimate is often 0 or unknown.
EXACT_BELOW = 100_000


@dataclass(frozen=True)
class ColumnInfo:
    name: str
    type: TypeEngine[Any]
    nullable: bool
    autoincrement: bool = False
    sql: str = ""  # the type as the database names it (`NUMERIC(12, 2)`, `TIMESTAMP WITH TIME ZONE`)


@dataclass(frozen=True)
class TableInfo:
    schema: str | None
    name: str
    view: bool
    columns: Sequence[ColumnInfo]
    primary_key: Sequence[str]
    unique: Sequence[Sequence[str]]  # unique indexes and constraints, each its columns in order
    indexed: frozenset[str]  # columns that lead an index (so a range or an ORDER BY on them is cheap)
    rows: int | None
    estimated: bool = False
    problems: Sequence[str] = field(default_factory=tuple)

    def column(self, name: str) -> ColumnInfo:
        return next(c for c in self.columns if c.name == name)

    @functools.cached_property
    def relation(self) -> Table:
        """The table as SQLAlchemy Core sees it, to build the probes' queries from (quoted right everywhere)."""
        return Table(self.name, MetaData(), *(Column(c.name, c.type) for c in self.columns), schema=self.schema)


def list_relations(conn: Connection, schema: str | None) -> list[tuple[str, bool]]:
    """(name, is a view) of every table and view in `schema` (the connection's default when None)."""
    inspector = inspect(conn)
    tables = [(name, False) for name in inspector.get_table_names(schema=schema)]
    views = [(name, True) for name in inspector.get_view_names(schema=schema)]
    return sorted(tables + views, key=lambda item: item[0].lower())


def describe_relation(conn: Connection, name: str, view: bool, schema: str | None) -> TableInfo:
    inspector = inspect(conn)
    columns = [
        ColumnInfo(c["name"], c["type"], bool(c.get("nullable", True)), c.get("autoincrement") is True,
                   _type_name(c["type"], conn))
        for c in inspector.get_columns(name, schema=schema)
    ]
    problems: list[str] = []
    primary_key: list[str] = []
    unique: list[list[str]] = []
    indexed: set[str] = set()
    if not view:
        primary_key = list(inspector.get_pk_constraint(name, schema=schema).get("constrained_columns") or [])
        try:
            indexes = inspector.get_indexes(name, schema=schema)
            constraints = inspector.get_unique_constraints(name, schema=schema)
        except (SQLAlchemyError, NotImplementedError) as exc:
            indexes, constraints = [], []
            problems.append(f"indexes not readable ({type(exc).__name__})")
        for index in indexes:
            names = [c for c in index.get("column_names") or [] if c]
            if names:
                indexed.add(names[0])
                if index.get("unique"):
                    unique.append(names)
        unique += [list(c["column_names"]) for c in constraints if c.get("column_names")]
        if primary_key:
            indexed.add(primary_key[0])
    distinct = [u for i, u in enumerate(unique) if u not in unique[:i] and u != primary_key]
    rows, estimated = _row_count(conn, TableInfo(schema, name, view, columns, primary_key, distinct,
                                                 frozenset(indexed), None))
    return TableInfo(schema, name, view, columns, primary_key, distinct, frozenset(indexed), rows, estimated,
                     tuple(problems))


def _type_name(sql: TypeEngine[Any], conn: Connection) -> str:
    for dialect in (conn.dialect, None):  # the database's own spelling, else the generic one
        try:
            return str(sql.compile(dialect=dialect))
        except Exception:  # a type this dialect cannot render (NullType of an unknown ODBC type)
            continue
    return type(sql).__name__


def _row_count(conn: Connection, table: TableInfo) -> tuple[int | None, bool]:
    estimate = None if table.view else _estimate(conn, table)
    if estimate is not None and estimate >= EXACT_BELOW:
        return estimate, True
    return int(conn.execute(select(func.count()).select_from(table.relation)).scalar_one()), False


def _estimate(conn: Connection, table: TableInfo) -> int | None:
    """The database's kept estimate, or None (none kept, never analysed, not this kind of database)."""
    dialect = conn.dialect.name
    if dialect == "postgresql":
        found = conn.execute(
            text("SELECT c.reltuples FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                 "WHERE c.relname = :name AND n.nspname = COALESCE(:schema, current_schema())"),
            {"name": table.name, "schema": table.schema},
        ).scalar()
        return int(found) if found is not None and found >= 0 else None  # -1: never vacuumed or analysed
    if dialect in ("mysql", "mariadb"):
        found = conn.execute(
            text("SELECT TABLE_ROWS FROM information_schema.TABLES "
                 "WHERE TABLE_NAME = :name AND TABLE_SCHEMA = COALESCE(:schema, DATABASE())"),
            {"name": table.name, "schema": table.schema},
        ).scalar()
        return int(found) if found is not None else None
    return None
