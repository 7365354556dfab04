"""ODBC drivers through SQLAlchemy: every mode works on a database reached only by its ODBC driver.

Uses Debian's real drivers (unixodbc, odbc-postgresql, odbc-mariadb, libsqliteodbc), which
scripts/test.sh installs when it runs as root; without them these tests are skipped.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, update
from sqlalchemy.engine import make_url

from fixtures.legacy_orders import create_orders, order_rows
from tests.helpers import orders_config, read_stream, run_once

pyodbc = pytest.importorskip("pyodbc", reason="pyodbc is not installed: .venv/bin/pip install pyodbc")

DRIVERS = {"postgresql": "PostgreSQL Unicode", "mariadb": "MariaDB Unicode", "sqlite": "SQLite3"}


def odbc_url(kind: str, native: str) -> str:
    """The ODBC way to the same scratch database as the native URL."""
    if DRIVERS[kind] not in pyodbc.drivers():
        pytest.skip(f"ODBC driver [{DRIVERS[kind]}] is not installed (odbcinst -q -d); run scripts/test.sh as root "
                    "or apt-get install unixodbc odbc-postgresql odbc-mariadb libsqliteodbc")
    url = make_url(native)
    if kind == "postgresql":  # no SQLAlchemy dialect for PostgreSQL over ODBC: straw's generic one
        return (f"odbc:Driver={{PostgreSQL Unicode}};Server={url.host};Port={url.port or 5432};"
                f"Database={url.database};Uid={url.username};Pwd={url.password or ''};")
    if kind == "sqlite":
        return f"odbc:Driver={{SQLite3}};Database={url.database};"
    # MariaDB: SQLAlchemy's own mysql dialect, driven by pyodbc
    return f"mysql+pyodbc://{url.username}@{url.host}:{url.port or 3306}/{url.database}?driver=MariaDB+Unicode"


@pytest.mark.parametrize("mode", ["incrementing", "timestamp", "snapshot"])
def test_every_mode_through_an_odbc_driver(
    tmp_path: Path, db_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str, mode: str
) -> None:
    native = create_engine(db_url)
    table = create_orders(native, 12)
    url = odbc_url(native.dialect.name if native.dialect.name != "mysql" else "mariadb", db_url)
    extra = {"timestamp_column": None, "key_column": None} if mode == "snapshot" else {}
    path = orders_config(tmp_path, db_url=url, redis_url=redis_url, stream=stream_name, mode=mode, batch_size=5,
                         **extra)
    result = run_once(path)
    assert result.errors == [] and result.rows_read == 12
    events = [e["event"] for e in read_stream(redis_client, stream_name)]
    assert [e["subject"] for e in events] == [str(n) for n in range(1, 13)]
    first = order_rows(1)[0]
    assert events[0]["data"]["amount"] == f"{first['AMOUNT']:.2f}"  # exact decimal, through ODBC too
    assert events[0]["data"]["order_date"] == "2026-11-01"
    assert events[0]["data"]["changed_at"] == "2026-11-01T08:00:37+01:00"

    with native.begin() as conn:
        conn.execute(update(table).where(table.c.ORDER_NO == 3).values(STATUS="SHIPPED", CHANGED_AT=order_rows(
            1, first=99)[0]["CHANGED_AT"]))
    assert run_once(path).errors == []
    later = [e["event"] for e in read_stream(redis_client, stream_name)][12:]
    # incrementing mode sees new rows only; the others see the change
    assert [e["subject"] for e in later] == ([] if mode == "incrementing" else ["3"])
    native.dispose()
