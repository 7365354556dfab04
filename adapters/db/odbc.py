"""A generic SQLAlchemy dialect over pyodbc, for databases that have only an ODBC driver.

Access, DB2/AS400, Progress, old Informix… often have no SQLAlchemy dialect, but an
ODBC driver. Configured as `url: "odbc:DSN=legacy;UID=straw;PWD=${ERP_PWD}"` (or
`odbc:Driver={…};Server=…`), a source reaches them through this dialect, so every
mode works the same: tables are reflected through the ODBC catalog functions
(SQLColumns, SQLPrimaryKeys), identifiers are quoted with the driver's own quote
character, and row limits use `LIMIT` where the DBMS is known to accept it, else
the SQL:2008 `FETCH FIRST n ROWS ONLY`.

Where SQLAlchemy has a real dialect with a pyodbc driver (`mssql+pyodbc`,
`mysql+pyodbc`), use that URL instead: it knows the SQL flavour better.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote_plus

from sqlalchemy import types as sqltypes
from sqlalchemy.connectors.pyodbc import PyODBCConnector
from sqlalchemy.dialects import registry
from sqlalchemy.engine import default
from sqlalchemy.sql import compiler

PREFIX = "odbc:"
_LIMIT_DBMS = ("postgresql", "sqlite", "mysql", "mariadb", "db2", "h2", "hsql")

# ODBC SQL data type codes (sql.h / sqlext.h) -> SQLAlchemy types
_CHAR = {1, -8}  # SQL_CHAR, SQL_WCHAR
_TEXT = {12, -1, -9, -10}
_CHAR_NAME = re.compile(r"\s*(?:N?CHAR|CHARACTER|BPCHAR)\b", re.I)
_NUMERIC_NAME = re.compile(r"\s*(?:NUMERIC|DECIMAL)\s*\(\s*(\d+)\s*(?:,\s*(\d+)\s*)?\)", re.I)
_INTEGER = {4: sqltypes.Integer, 5: sqltypes.SmallInteger, -6: sqltypes.SmallInteger, -5: sqltypes.BigInteger}
_BINARY = {-2, -3, -4}


def url_for(odbc: str) -> str:
    """`odbc:<connection string or DSN=…>` as the SQLAlchemy URL of this dialect."""
    return "odbc+pyodbc:///?odbc_connect=" + quote_plus(odbc.removeprefix(PREFIX))


class _Compiler(compiler.SQLCompiler):
    def limit_clause(self, select: Any, **kw: Any) -> str:
        if getattr(self.dialect, "limit_style", "limit") == "limit":
            return str(super().limit_clause(select, **kw))  # type: ignore[no-untyped-call]
        text = ""
        if select._offset_clause is not None:
            text += " OFFSET " + self.process(select._offset_clause, **kw) + " ROWS"
        if select._limit_clause is not None:
            text += " FETCH FIRST " + self.process(select._limit_clause, **kw) + " ROWS ONLY"
        return text


class _SqliteText(sqltypes.DateTime):
    """SQLite keeps timestamps as text and compares them as text: bind a watermark in the text form that
    SQLAlchemy's sqlite dialect writes ('2026-11-01 08:00:37.000000'), or '…37' would sort before '…37.000000'."""

    def bind_processor(self, dialect: Any) -> Any:
        return lambda value: value.isoformat(" ", "microseconds") if value is not None else None


class GenericOdbcDialect(PyODBCConnector, default.DefaultDialect):
    name = "odbc"
    driver = "pyodbc"
    supports_statement_cache = True
    statement_compiler = _Compiler
    supports_native_decimal = True
    supports_native_boolean = False
    postfetch_lastrowid = False
    limit_style = "limit"

    def initialize(self, connection: Any) -> None:
        super().initialize(connection)
        dbapi_connection = connection.connection.dbapi_connection
        pyodbc = self.loaded_dbapi
        dbms = str(dbapi_connection.getinfo(pyodbc.SQL_DBMS_NAME) or "").lower()
        self.limit_style = "limit" if dbms.startswith(_LIMIT_DBMS) else "fetch"
        if dbms.startswith("sqlite"):
            self.colspecs = {**self.colspecs, sqltypes.DateTime: _SqliteText}
        quote = str(dbapi_connection.getinfo(pyodbc.SQL_IDENTIFIER_QUOTE_CHAR) or '"').strip() or '"'
        self.identifier_preparer = self.preparer(self, initial_quote=quote)

    def _get_server_version_info(self, connection: Any) -> tuple[int | str, ...]:
        try:
            return tuple(super()._get_server_version_info(connection))
        except Exception:  # a driver without SQL_DBMS_VER: the version only tunes SQL, which we keep generic
            return ()

    # --- reflection through the ODBC catalog ---

    def _cursor(self, connection: Any) -> Any:
        return connection.connection.dbapi_connection.cursor()

    def has_table(self, connection: Any, table_name: str, schema: str | None = None, **kw: Any) -> bool:
        cursor = self._cursor(connection)
        try:
            return cursor.tables(table=table_name, schema=schema).fetchone() is not None
        finally:
            cursor.close()

    def get_table_names(self, connection: Any, schema: str | None = None, **kw: Any) -> list[str]:
        cursor = self._cursor(connection)
        try:
            return [row.table_name for row in cursor.tables(schema=schema, tableType="TABLE").fetchall()]
        finally:
            cursor.close()

    def get_view_names(self, connection: Any, schema: str | None = None, **kw: Any) -> list[str]:
        cursor = self._cursor(connection)
        try:
            return [row.table_name for row in cursor.tables(schema=schema, tableType="VIEW").fetchall()]
        finally:
            cursor.close()

    def get_columns(  # type: ignore[override]  # plain dicts with the ReflectedColumn keys
        self, connection: Any, table_name: str, schema: str | None = None, **kw: Any
    ) -> list[dict[str, Any]]:
        cursor = self._cursor(connection)
        try:
            rows = cursor.columns(table=table_name, schema=schema).fetchall()
        finally:
            cursor.close()
        return [
            {
                "name": row.column_name,
                "type": _sql_type(int(row.data_type), row.column_size, row.decimal_digits, row.type_name),
                "nullable": row.nullable != 0,
                "default": None,
            }
            for row in rows
        ]

    def get_pk_constraint(  # type: ignore[override]  # a plain dict with the constraint's keys
        self, connection: Any, table_name: str, schema: str | None = None, **kw: Any
    ) -> dict[str, Any]:
        cursor = self._cursor(connection)
        try:
            rows = cursor.primaryKeys(table_name, schema=schema).fetchall()
        except self.loaded_dbapi.Error:  # not every driver implements SQLPrimaryKeys
            rows = []
        finally:
            cursor.close()
        ordered = sorted(rows, key=lambda r: r.key_seq)
        return {"constrained_columns": [r.column_name for r in ordered], "name": None}

    def get_foreign_keys(self, *args: Any, **kw: Any) -> list[Any]:
        return []  # straw reads single tables; relations between them do not matter here

    def get_indexes(self, *args: Any, **kw: Any) -> list[Any]:
        return []

    def get_unique_constraints(self, *args: Any, **kw: Any) -> list[Any]:
        return []

    def get_check_constraints(self, *args: Any, **kw: Any) -> list[Any]:
        return []

    def get_table_comment(  # type: ignore[override]
        self, connection: Any, table_name: str, schema: str | None = None, **kw: Any
    ) -> dict[str, Any]:
        return {"text": None}


def _sql_type(code: int, size: Any, digits: Any, name: Any = "") -> Any:
    # Some drivers (SQLite's) report CHAR(n) and DECIMAL(p,s) as SQL_VARCHAR: their names say what they are.
    named = _NUMERIC_NAME.match(str(name or "")) if code in _TEXT else None
    if named:
        return sqltypes.Numeric(int(named[1]), int(named[2] or 0), asdecimal=True)
    if code in _CHAR or (code in _TEXT and _CHAR_NAME.match(str(name or ""))):  # blank-padded (trim_char)
        return sqltypes.CHAR(size if isinstance(size, int) and 0 < size < 1_000_000 else None)
    if code in _TEXT:
        return sqltypes.String(size if isinstance(size, int) and 0 < size < 1_000_000 else None)
    if code in _INTEGER:
        return _INTEGER[code]()
    if code in (2, 3):  # NUMERIC, DECIMAL: exact, never float
        return sqltypes.Numeric(size, digits, asdecimal=True)
    if code in (6, 7, 8):
        return sqltypes.Float()
    if code in (9, 91):
        return sqltypes.Date()
    if code == 92:
        return sqltypes.Time()
    if code in (11, 93):
        return sqltypes.DateTime()
    if code == -7:
        return sqltypes.Boolean()
    if code in _BINARY:
        return sqltypes.LargeBinary()
    return sqltypes.NullType()


registry.register("odbc.pyodbc", "adapters.db.odbc", "GenericOdbcDialect")
registry.register("odbc", "adapters.db.odbc", "GenericOdbcDialect")
