"""Key sweep measures (issue 8 item 19): how fast, and in how much memory, hard deletes are found.

- `key_sweep_rows_per_s` / `key_sweep_peak_rss_mb`: one key sweep of a timestamp-mode
  source over a 1,000,000-row PostgreSQL table (quick: 100,000) after 0.5 % of its rows
  were deleted: the keys-only listing (server-side cursor), the marks committed per
  batch, the `deleted` records. Timed alone in a fresh process (its peak RSS is the
  process's); baseline the same on 100,000 rows (quick: 10,000). Flat RSS means memory
  does not grow with the table.

The outbox's delivered keys are written straight into it (as `Outbox.append` records
them for 1,000,000 delivered rows, without spending a minute delivering them first).
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import create_engine, text

from bench.db_bench import rate_and_rss, write_config
from bench.services import Bench, log
from outbox.store import Outbox
from straw.config_load import load_config
from straw.runner import build_pipeline, freeze_startup_objects, sweep_deletes

ROOT = Path(__file__).resolve().parent.parent
SOURCE = "erp-orders"


def _prime(config_path: Path, rows: int) -> None:
    """The outbox as after delivering keys 1..rows: their sweep state and the source's position."""
    outbox = Outbox(load_config(config_path).outbox.path)
    try:
        db = outbox.db
        db.execute("BEGIN")
        db.execute(
            "WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < ?) "
            "INSERT INTO sweep_keys (source, key, key_data, epoch, id) "
            "SELECT ?, n, '{\"order_no\":' || n || '}', 1, n FROM g",
            (rows, SOURCE),
        )
        db.execute("INSERT INTO sweep_sources (source, next_id) VALUES (?, ?)", (SOURCE, rows + 1))
        watermark = f'["2026-12-01T00:00:00",{rows}]'
        db.execute("INSERT INTO positions (source, position) VALUES (?, ?)", (SOURCE, watermark))
        db.execute("COMMIT")
    finally:
        outbox.close()


def _step(config_path: Path) -> dict[str, Any]:
    """One sweep in this (fresh) process."""
    config = load_config(config_path)
    pipeline = build_pipeline(config, config.sources[0])
    outbox = Outbox(config.outbox.path)
    freeze_startup_objects()  # as `Runner.run` does once its pipelines are built
    try:
        started = time.perf_counter()
        deleted = sweep_deletes(pipeline, outbox)
        seconds = time.perf_counter() - started
    finally:
        outbox.close()
        pipeline.source.close()
    return {"deleted": deleted, "seconds": seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _sweep(bench: Bench, url: str, table: str, rows: int) -> tuple[float, float]:
    work = bench.workdir("sweep")
    try:
        config = write_config(work, db_url=url, redis_url=bench.redis_url, stream="unused", mode="timestamp",
                              table=table, deletes={"sweep_interval": "1h"})
        _prime(config, rows)
        engine = create_engine(url)
        with engine.begin() as conn:
            conn.execute(text(f'DELETE FROM "{table}" WHERE "ORDER_NO" % 200 = 3'))
        engine.dispose()
        _vacuum(url, table)  # the visibility map: what lets PostgreSQL scan the index alone
        done = subprocess.run(
            [sys.executable, "-m", "bench.sweep_bench", "sweep", str(config)],
            cwd=ROOT, capture_output=True, text=True, check=False, timeout=1800,
        )
        if done.returncode != 0:
            raise RuntimeError(f"key sweep failed:\n{done.stderr[-2000:]}")
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    expected = rows // 200
    if abs(result["deleted"] - expected) > 1:
        raise RuntimeError(f"the sweep wrote {result['deleted']} deletes, expected {expected}")
    rate = rows / result["seconds"]
    log(f"key sweep of {rows:,} keys: {rate:,.0f} keys/s, {result['deleted']:,} deleted, "
        f"peak RSS {result['peak_rss_mb']:.0f} MB")
    return rate, float(result["peak_rss_mb"])


def _vacuum(url: str, table: str) -> None:
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(f'VACUUM ANALYZE "{table}"'))
    finally:
        engine.dispose()


def key_sweep(bench: Bench, big: int, small: int) -> list[dict[str, Any]]:
    return rate_and_rss("key_sweep", lambda url, table, rows: _sweep(bench, url, table, rows), big, small)


if __name__ == "__main__":
    # `python -m bench.sweep_bench sweep CONFIG`: the worker of `_sweep`.
    print(orjson.dumps(_step(Path(sys.argv[2]))).decode())
