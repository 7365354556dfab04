"""Refuse any configured `query` that is not exactly one read-only SELECT, before it reaches a database.

The read-only session (engine.py) is the last line, not the only one: a query text can
close the wrapping subquery, COMMIT, start a READ WRITE transaction and DELETE, if a
driver runs several statements from one string. So the text is parsed with sqlglot for
the source's dialect, and refused unless it is one query (SELECT, set operations of
SELECTs, VALUES, WITH … SELECT) containing no data-modifying statement, no `INTO`, no
locking clause, and no call to a function known to write or to run SQL it is given.

Functions are a denylist: a user-defined function cannot be seen into from the query
text; those run inside the read-only session, which refuses their writes.
"""

from __future__ import annotations

import functools
import logging
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlglot import exp

# SQLAlchemy backend name -> sqlglot dialect (None: sqlglot's generic SQL).
_DIALECTS = {
    "postgresql": "postgres",
    "mysql": "mysql",
    "mariadb": "mysql",
    "sqlite": "sqlite",
    "mssql": "tsql",
    "oracle": "oracle",
}
# For `odbc:` connection strings: the driver's name says which SQL it speaks.
_ODBC_DRIVERS = (("postgres", "postgres"), ("maria", "mysql"), ("mysql", "mysql"), ("sqlite", "sqlite"),
                 ("sql server", "tsql"), ("oracle", "oracle"))


# Functions that write, change server state, or execute SQL handed to them as text.
_WRITING_FUNCTIONS = frozenset({
    "nextval", "setval", "set_config", "pg_terminate_backend", "pg_cancel_backend", "pg_reload_conf",
    "pg_rotate_logfile", "pg_switch_wal", "pg_promote", "pg_create_restore_point", "pg_file_write",
    "pg_file_rename", "pg_file_unlink", "pg_logdir_ls", "pg_drop_replication_slot", "pg_replication_origin_create",
    "pg_replication_origin_drop", "pg_notify", "pg_import_system_collations", "txid_current", "pg_current_xact_id",
    "query_to_xml", "query_to_xml_and_xmlschema", "cursor_to_xml", "table_to_xml",
    "load_extension", "writefile", "edit", "get_lock", "release_lock", "release_all_locks", "sys_exec", "sys_eval",
    "xp_cmdshell", "sp_executesql", "openrowset", "opendatasource", "dbms_sql", "utl_file",
})
_WRITING_PREFIXES = ("lo_", "dblink", "pg_advisory_", "pg_try_advisory_", "pg_create_", "pg_drop_", "pg_stat_reset")
# MySQL/MariaDB run `/*! … */` as code; every parser reads it as a comment.
_EXECUTABLE_COMMENT = re.compile(r"/\*!")



@functools.cache
def _writes() -> tuple[type[Any], ...]:
    # sqlglot is imported on first use: it costs half a second, and most configurations have no `query`.
    from sqlglot import exp

    # sqlglot logs "falling back to parsing as a Command" for statements it does not model; straw refuses
    # those and says so itself.
    logging.getLogger("sqlglot").setLevel(logging.ERROR)
    return (exp.DML, exp.DDL, exp.Command, exp.Into, exp.Lock, exp.Set, exp.Transaction, exp.Commit,
            exp.Rollback, exp.Pragma, exp.Copy, exp.Execute, exp.Use)


def dialect_for(url: str) -> str | None:
    """The sqlglot dialect of a source URL (a SQLAlchemy URL or `odbc:…`)."""
    if url.startswith("odbc:"):
        lowered = url.lower()
        return next((d for word, d in _ODBC_DRIVERS if word in lowered), None)
    scheme = url.split(":", 1)[0].split("+", 1)[0].lower()
    return _DIALECTS.get(scheme)


def refusal(query: str, dialect: str | None) -> str | None:
    """Why `query` may not be sent (one line), or None when it is one read-only query."""
    import sqlglot
    from sqlglot import exp
    from sqlglot.errors import SqlglotError

    writes = _writes()
    if _EXECUTABLE_COMMENT.search(query):
        return "holds a `/*! … */` comment, which MySQL and MariaDB execute as code; remove it"
    try:
        parsed = sqlglot.parse(query, read=dialect)
        # A comment after the final `;` parses as an empty Semicolon statement.
        statements = [s for s in parsed if s is not None and not isinstance(s, exp.Semicolon)]
    except SqlglotError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return f"cannot be read as one SELECT ({first}); write a single SELECT, without `;` between statements"
    if len(statements) != 1:
        return (f"holds {len(statements)} statements; write exactly one SELECT (a `;` may appear only inside "
                "a string or comment, or once at the end)")
    root = statements[0]
    if not isinstance(root, exp.Query):
        kind = str(root.this).split()[0] if isinstance(root, exp.Command) and root.this else root.key
        return f"is not a SELECT but {kind.upper()}; straw only reads: write one SELECT"
    for node in root.walk():
        reason = _refused_node(node, writes)
        if reason:
            return reason
    return None


def sendable(query: str, dialect: str | None) -> str:
    """`query` ready to nest in `SELECT … FROM (…) q`: without its final `;` and what follows it.

    A trailing `-- comment` stays harmless because straw closes the parenthesis on a new line.
    """
    import sqlglot
    from sqlglot import TokenType

    tokens = sqlglot.Dialect.get_or_raise(dialect).tokenize(query)
    end = len(tokens)
    while end and tokens[end - 1].token_type is TokenType.SEMICOLON:
        end -= 1
    return query[: tokens[end - 1].end + 1] if end < len(tokens) else query


def _refused_node(node: exp.Expr, writes: tuple[type[Any], ...]) -> str | None:
    from sqlglot import exp

    if isinstance(node, exp.Lock):
        return "has a locking clause (FOR UPDATE / FOR SHARE / LOCK IN SHARE MODE); straw only reads: remove it"
    if isinstance(node, exp.Into):
        return "has SELECT … INTO, which writes a table or file; remove the INTO clause"
    if isinstance(node, writes):
        return f"contains a {node.key.upper()} statement; straw only reads: write one SELECT without it"
    if isinstance(node, exp.Func):
        name = (node.name if isinstance(node, exp.Anonymous) else node.sql_name()).lower()
        if name in _WRITING_FUNCTIONS or name.startswith(_WRITING_PREFIXES) or isinstance(
            node, (exp.NextValueFor,)
        ):
            return f"calls {name}(), which writes or runs SQL given as text; straw only reads: remove it"
    return None
