"""`straw check` for a loader: its target is reachable (or can be created), one line, and nothing written."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, inspect
from sqlalchemy.engine import Engine, make_url

from loaders.sql import SqlLoader
from loaders.sql_schema import SchemaError
from straw.config import EntitySpec
from straw.config_loaders import AnyLoaderSpec, JsonlLoaderSpec
from straw.folders import nearest_folder
from straw.redact import describe

CONNECT_TIMEOUT = 10  # seconds: a check that waits minutes for an unroutable host is no check
_TIMEOUT_ARGS = {"postgresql": "connect_timeout", "mysql": "connect_timeout", "mariadb": "connect_timeout"}


def check_target(spec: AnyLoaderSpec, entities: Mapping[str, EntitySpec]) -> tuple[bool, str, bool]:
    """(ok, one line, only a warning): the JSON Lines folder is writable or can be made; the SQL target answers."""
    if isinstance(spec, JsonlLoaderSpec):
        return (*_folder(spec.directory), False)
    absent = missing_sqlite(spec.url)
    if absent is not None:
        ok, detail = _folder(absent.parent)
        return ok, f"SQLite {absent} not created yet; {detail}" if ok else detail, False
    try:
        loader = SqlLoader(spec, entities, engine=target_engine(spec.url))
    except SchemaError as exc:
        return False, str(exc), False
    except Exception as exc:  # a missing driver, a bad query string
        return False, describe(exc), False
    try:
        with loader.engine.connect() as conn:
            version = ".".join(str(part) for part in conn.dialect.server_version_info or ())
            tables = set(inspect(conn).get_table_names(schema=spec.db_schema))
    except Exception as exc:  # down, refusing, wrong password, unknown database
        return False, describe(exc), False
    finally:
        loader.close()
    applied = loader.applied.name
    state = f"{applied} present" if applied in tables else f"nothing applied yet (no {applied} table)"
    missing = sorted({spec.table_of(e) for e in entities} - tables)
    if missing and not spec.create_tables:  # only a warning: this loader's streams may never carry those entities
        return False, (f"{loader.dialect} {version} reachable; {state}; no table {', '.join(missing)} and "
                       "create_tables is off: a record of its entity stops the loader (create it, or set "
                       "create_tables: true)"), True
    return True, f"{loader.dialect} {version} reachable; {state}", False


def target_engine(url: str) -> Engine:
    """An engine on a loader's target for a look (`check`, `status`): a connect gives up after 10 s."""
    backend = make_url(url).get_backend_name()
    connect_args: dict[str, Any] = {_TIMEOUT_ARGS[backend]: CONNECT_TIMEOUT} if backend in _TIMEOUT_ARGS else {}
    return create_engine(url, connect_args=connect_args)


def missing_sqlite(url: str) -> Path | None:
    """A SQLite target's file if it does not exist yet: connecting would create it, which a look must not."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        path = Path(parsed.database)
        return None if path.exists() else path
    return None


def _folder(directory: Path) -> tuple[bool, str]:
    """A folder the loader writes into: writable, or its nearest existing parent lets it be made."""
    folder, problem = nearest_folder(directory)
    if problem:
        return False, f"{directory}: {problem}" if folder == directory else f"{directory}: cannot be created: {problem}"
    if folder != directory:
        return True, f"{directory} (not created yet; {folder} is writable)"
    return True, f"{directory} (writable)"
