"""A large legacy table made fast (a SQLite recursive CTE, a million rows in about a second) and a config
with a two-field entity for it, so that a million events stay small in Redis."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import Counter
from contextlib import closing
from pathlib import Path
from typing import Any

import redis
import yaml

from straw.config_load import load_config
from straw.runner import Runner


def big_table(path: Path, rows: int, first: int = 1) -> str:
    """ITEMS(ID, V) with IDs first..first+rows-1 in the SQLite file `path`; returns its URL."""
    with closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE IF NOT EXISTS ITEMS (ID INTEGER PRIMARY KEY, V TEXT NOT NULL)")
        db.execute(
            "WITH RECURSIVE n(i) AS (SELECT ? UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
            "INSERT INTO ITEMS (ID, V) SELECT i, 'v' || i FROM n",
            (first, first + rows - 1),
        )
        db.commit()
    return f"sqlite:///{path}"


def items_config(directory: Path, *, db_url: str, redis_url: str, stream: str, **source: Any) -> Path:
    spec: dict[str, Any] = {
        "name": "items", "kind": "db", "url": db_url, "table": "ITEMS", "mode": "incrementing",
        "incrementing_column": "ID", "entity": "item", "stream": stream,
        "mapping": {"id": "ID", "v": "V"}, "batch_size": 5000, "poll_interval": 0.05,
    }
    spec.update(source)
    if spec["mode"] != "incrementing":
        del spec["incrementing_column"]
    config = {
        "instance": "test",
        "redis": {"url": redis_url},
        "outbox": {"path": str(directory / "outbox.db")},
        "relay": {"batch_size": 2000, "idle_interval": 0.02, "backoff_max": 1.0},
        "entities": {"item": {"key": ["id"], "fields": {"id": "integer", "v": "string"}}},
        "sources": [spec],
    }
    path = directory / "straw.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def positions_in_stream(client: redis.Redis, stream: str, chunk: int = 50_000) -> Counter[bytes]:
    """How often each source position (one per row) is in the stream, read in chunks."""
    seen: Counter[bytes] = Counter()
    start = "-"
    while entries := client.xrange(stream, min=start, count=chunk):
        seen.update(fields[b"pos"] for _id, fields in entries)
        start = "(" + entries[-1][0].decode()
    return seen


def assert_each_row_once(client: redis.Redis, stream: str, rows: int) -> None:
    seen = positions_in_stream(client, stream)
    twice = sum(1 for n in seen.values() if n > 1)
    assert twice == 0, f"{twice} rows are in the stream more than once"
    assert len(seen) == rows, f"{rows - len(seen)} rows never reached the stream"


def run_until_published(path: Path, client: redis.Redis, stream: str, count: int, linger: float = 0.0) -> None:
    """`straw run` (in a thread) until `stream` holds `count` entries (a minute at most), `linger` s more, stop."""
    runner = Runner(load_config(path))
    thread = threading.Thread(target=runner.run)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while int(client.xlen(stream)) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(linger)
    finally:
        runner.stop.set()
        thread.join(timeout=30)
