"""The cost of `bus.durability: replicated`: the slice into a private Redis primary with one replica.

Both sides run the real `straw run --once` into the same primary (loopback,
replica in sync); the baseline waits for nothing (`ack`), the measure waits
for the replica after each batch (`WAIT 1`) before marking it published.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import redis
import yaml

from bench.legacy import legacy_database
from bench.services import Bench, log
from bench.slice_bench import write_config
from straw.config_load import load_config
from straw.local_redis import RedisServer, start_private_redis
from straw.runner import Runner


def _replicated_pair(directory: Path) -> tuple[RedisServer, RedisServer]:
    primary = start_private_redis(directory / "primary", persist=False)
    replica = start_private_redis(directory / "replica", persist=False)
    client = redis.Redis.from_url(replica.url)
    client.replicaof("127.0.0.1", primary.port)
    deadline = time.monotonic() + 30
    while client.info("replication").get("master_link_status") != "up":
        if time.monotonic() > deadline:
            raise RuntimeError("the bench replica did not connect")
        time.sleep(0.05)
    client.close()
    return primary, replica


def _run(bench: Bench, db_url: str, primary: RedisServer, rows: int, durability: str) -> float:
    work = bench.workdir(f"durability-{durability}")
    try:
        path = write_config(work, db_url=db_url, redis_url=primary.url, stream="bench.durability")
        document: dict[str, Any] = yaml.safe_load(path.read_text())
        document.pop("redis")
        document["bus"] = {"url": primary.url, "durability": durability, "replicas": 1}
        path.write_text(yaml.safe_dump(document, sort_keys=False))
        started = time.perf_counter()
        result = Runner(load_config(path)).run(once=True)
        elapsed = time.perf_counter() - started
        if result.errors or result.rows_read != rows:
            raise RuntimeError(f"straw run failed: read {result.rows_read} of {rows} rows; {result.errors}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        client = redis.Redis.from_url(primary.url)
        client.flushall()  # the next run starts from an empty stream, like the slice's fresh one
        client.close()
    return elapsed


def replicated_slice(bench: Bench, rows: int, repeat: int) -> dict[str, Any]:
    primary, replica = _replicated_pair(bench.tmp / "durability")
    try:
        with legacy_database(bench, "sqlite", rows) as url:
            _run(bench, url, primary, rows, "ack")  # warm-up
            timed: dict[str, list[float]] = {"ack": [], "replicated": []}
            for rep in range(repeat):
                order = ("ack", "replicated") if rep % 2 == 0 else ("replicated", "ack")
                for durability in order:
                    timed[durability].append(_run(bench, url, primary, rows, durability))
    finally:
        primary.kill()
        replica.kill()
    rates = {k: sorted(rows / s for s in v)[len(v) // 2] for k, v in timed.items()}
    log(f"slice_sqlite_replicated_rows_per_s: replicated {rates['replicated']:,.0f}, ack {rates['ack']:,.0f} rows/s")
    return {
        "measure": "slice_sqlite_replicated_rows_per_s", "value": round(rates["replicated"], 1), "unit": "rows/s",
        "baseline": "durability_ack", "baseline_value": round(rates["ack"], 1),
    }
