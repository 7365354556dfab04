"""Values the driver itself cannot decode: the batch is narrowed to the row, a dead letter; the rest flows.

PostgreSQL timestamp/date 'infinity' (psycopg: "timestamp too large (after year 10K)"),
SQLite TEXT that is not UTF-8 (sqlite3: "Could not decode to UTF-8 column …"): before,
no row of the batch was delivered and the position never moved.
"""

from __future__ import annotations

from pathlib import Path

import redis
from sqlalchemy import create_engine, text

from fixtures.legacy_orders import create_orders
from tests.helpers import dead_letters, orders_config, read_stream, run_once, source_state


def legacy_orders(url: str, count: int, *statements: str) -> None:
    """The fixture ORDERS table with `count` rows, then `statements` run on it (hostile values)."""
    engine = create_engine(url)
    create_orders(engine, count)
    with engine.begin() as conn:
        for statement in statements:
            conn.execute(text(statement))
    engine.dispose()


def _subjects(client: redis.Redis, stream: str) -> list[str]:
    return [e["event"]["subject"] for e in read_stream(client, stream)]


def test_postgresql_infinity_dates_are_dead_letters_and_the_position_moves(
    tmp_path: Path, pg_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    legacy_orders(
        pg_url,
        20,
        """UPDATE "ORDERS" SET "CHANGED_AT" = 'infinity' WHERE "ORDER_NO" = 3""",
        """UPDATE "ORDERS" SET "ORDER_DATE" = '-infinity' WHERE "ORDER_NO" = 11""",
    )
    path = orders_config(tmp_path, db_url=pg_url, redis_url=redis_url, stream=stream_name, batch_size=8)

    result = run_once(path)
    assert not result.errors
    assert _subjects(redis_client, stream_name) == [str(n) for n in range(1, 21) if n not in (3, 11)]
    dead = dead_letters(tmp_path)
    assert [d["position"] for d in dead] == ["[3]", "[11]"]
    assert dead[0]["reason"].startswith(
        "field 'changed_at' (column 'CHANGED_AT'): the database driver cannot read 'infinity': "
        "DataError: timestamp too large (after year 10K)"
    )
    assert "cannot read '-infinity': DataError: date too small (before year 1)" in dead[1]["reason"]
    assert '"CHANGED_AT":{"$unreadable":"infinity"}' in dead[0]["raw"]
    assert source_state(tmp_path, "orders")[0] == "[20]"

    again = run_once(path)  # nothing new: no event, no dead letter twice
    assert not again.errors
    assert len(_subjects(redis_client, stream_name)) == 18 and len(dead_letters(tmp_path)) == 2


def test_postgresql_infinity_in_a_snapshot_listing(
    tmp_path: Path, pg_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    legacy_orders(
        pg_url,
        12,
        """UPDATE "ORDERS" SET "CHANGED_AT" = 'infinity' WHERE "ORDER_NO" = 5""",
    )
    path = orders_config(tmp_path, db_url=pg_url, redis_url=redis_url, stream=stream_name, mode="snapshot",
                         batch_size=4, timestamp_column=None, key_column=None)
    assert not run_once(path).errors
    assert not run_once(path).errors  # a second listing: the row stays, unchanged, and is not deleted
    events = read_stream(redis_client, stream_name)
    assert [e["event"]["subject"] for e in events] == [str(n) for n in range(1, 13) if n != 5]
    assert all(e["event"]["type"] == "order.upserted" for e in events)
    assert [d["reason"].split(":")[0] for d in dead_letters(tmp_path)] == ["field 'changed_at' (column 'CHANGED_AT')"]


def test_sqlite_text_that_is_not_utf8_is_a_dead_letter_even_with_cp1252(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    url = f"sqlite:///{tmp_path / 'legacy.db'}"
    legacy_orders(
        url,
        30,
        """UPDATE "ORDERS" SET "CUST_NAME" = CAST(x'4361668e' AS TEXT) WHERE "ORDER_NO" = 7""",
    )
    path = orders_config(tmp_path, db_url=url, redis_url=redis_url, stream=stream_name, batch_size=10,
                         encoding="cp1252")

    result = run_once(path)
    assert not result.errors
    assert _subjects(redis_client, stream_name) == [str(n) for n in range(1, 31) if n != 7]
    [dead] = dead_letters(tmp_path)
    assert dead["position"] == "[7]"
    assert dead["reason"].startswith(
        "field 'customer' (column 'CUST_NAME'): the database driver cannot read b'Caf\\x8e': "
        "OperationalError: Could not decode to UTF-8 column 'CUST_NAME'"
    )
    assert source_state(tmp_path, "orders")[0] == "[30]"


_READ_ALL = """
import resource, sys, tracemalloc
from straw.config_load import load_config
from straw.runner import build_pipeline
config = load_config(sys.argv[1])
source = build_pipeline(config, config.sources[0]).source
rows = batches = widest = 0
tracemalloc.start()
for batch in source.read(None):
    rows, batches, widest = rows + len(batch.rows), batches + 1, max(widest, len(batch.rows))
source.close()
peak = tracemalloc.get_traced_memory()[1] // 2**20
print(rows, batches, widest, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, peak)
"""


def test_a_batch_closes_at_the_byte_budget_so_memory_follows_it_not_the_row_count(
    tmp_path: Path, redis_url: str, stream_name: str
) -> None:
    """120 rows of 2 MB within one batch_size: one batch and 303 MB peak before; with a 16 MB budget 8 rows a batch."""
    import os
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 'legacy.db'}"
    legacy_orders(
        url,
        120,
        """UPDATE "ORDERS" SET "NOTE" = printf('%.*c', 2000000, 'x') || "ORDER_NO" """,
    )
    path = orders_config(tmp_path, db_url=url, redis_url=redis_url, stream=stream_name, batch_size=1000,
                         batch_bytes=16 * 2**20)
    # A fixed mmap threshold: glibc's moving one keeps freed 2 MB blocks in the heap, which measures malloc, not us.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    done = subprocess.run([sys.executable, "-c", _READ_ALL, str(path)], capture_output=True, text=True, check=True,
                          env=env)
    rows, batches, widest, rss_mb, python_mb = map(int, done.stdout.split())
    assert rows == 120 and widest <= 10 and batches >= 12, done.stdout
    # What the read itself holds, counted by Python (RSS also counts what the allocator keeps and the kernel's
    # page handling, and swung from 104 to 267 MB with the rest of the suite running): about two batches.
    assert python_mb < 48, f"the read held {python_mb} MB at its peak for a 16 MB budget (RSS {rss_mb} MB)"


def test_mariadb_zero_dates_are_dead_letters(
    tmp_path: Path, mariadb_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    """pymysql hands '0000-00-00' over as text: it never breaks the fetch, and the mapping refuses it."""
    legacy_orders(
        mariadb_url,
        6,
        "SET SESSION sql_mode = ''",
        "UPDATE ORDERS SET ORDER_DATE = '0000-00-00' WHERE ORDER_NO = 2",
        "UPDATE ORDERS SET CHANGED_AT = '0000-00-00 00:00:00' WHERE ORDER_NO = 5",
    )
    path = orders_config(tmp_path, db_url=mariadb_url, redis_url=redis_url, stream=stream_name)
    assert not run_once(path).errors
    assert _subjects(redis_client, stream_name) == ["1", "3", "4", "6"]
    assert [d["reason"] for d in dead_letters(tmp_path)] == [
        "field 'order_date' (column 'ORDER_DATE'): cannot read '0000-00-00' (str) as date: expected YYYY-MM-DD",
        "field 'changed_at' (column 'CHANGED_AT'): cannot read '0000-00-00 00:00:00' (str) as datetime: "
        "expected ISO 8601",
    ]
