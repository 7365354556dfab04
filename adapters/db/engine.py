"""Engines for legacy databases: read-only sessions, pooled, pinged before use."""

from __future__ import annotations

from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url

# The statement each dialect understands for "this session never writes".
_READ_ONLY = {
    "postgresql": "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
    "mysql": "SET SESSION TRANSACTION READ ONLY",
    "mariadb": "SET SESSION TRANSACTION READ ONLY",
    "sqlite": "PRAGMA query_only = ON",
}


def make_engine(url: str, *, read_only: bool = True) -> Engine:
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    options: dict[str, Any] = {"pool_pre_ping": True, "pool_size": 2} if backend != "sqlite" else {}
    engine = create_engine(parsed, **options)
    statement = _READ_ONLY.get(backend) if read_only else None
    if statement:

        @event.listens_for(engine, "connect")
        def _read_only(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute(statement)
            finally:
                cursor.close()
            if backend == "postgresql":
                # SET outside a transaction block must be committed under psycopg's implicit transactions.
                dbapi_connection.commit()

    return engine
