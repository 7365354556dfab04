"""Change latency (issue 15): commit on the legacy database -> entry on the stream, with `settle: auto`.

A writer commits 50 changes/s (one INSERT each, its own transaction) into a PostgreSQL
table that straw polls every second (timestamp mode, the demo's columns); a consumer
blocks on the stream and stamps each entry's arrival. Latency = arrival - the writer's
commit returning, per change; p50 and p99 over the run.

- `change_latency_p99_ms`: nothing else open on the database; baseline the same with
  `settle: off`. With nothing open the ledger's highest value is final at once, so the
  two should be within noise: the poll interval dominates.
- `change_latency_p99_100ms_ms`: as `change_latency_p99_ms`, polled every 100 ms (issue 14: p99 within
  the poll interval + 200 ms at both intervals); baseline the same with `settle: off`.
- `change_latency_p99_long_txn_ms`: the same with a concurrent long transaction (another
  session writes a row of another table and keeps its transaction open 2 s, over and
  over); baseline the same with `settle: off`. The gap is the price of never losing a
  late commit: rows wait for the open transaction to end.
"""

from __future__ import annotations

import shutil
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import redis
import yaml
from sqlalchemy import MetaData, create_engine, text

from bench.db_bench import write_config
from bench.services import Bench, log, postgres_database
from fixtures.legacy_orders import orders_table
from straw.config_load import load_config
from straw.runner import Runner

RATE = 50.0  # changes per second
LONG_TXN = 2.0  # seconds the concurrent transaction stays open each time


def _config(directory: Path, url: str, redis_url: str, stream: str, settle: str, interval: float) -> Path:
    """The idle-poll bench's timestamp-mode config, polled every `interval` s, with the `settle` under test."""
    path = write_config(directory, db_url=url, redis_url=redis_url, stream=stream, mode="timestamp")
    config = yaml.safe_load(path.read_text())
    config["sources"][0].update(poll_interval=interval, settle=settle)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _run(
    bench: Bench, url: str, *, settle: str, long_txn: bool, seconds: float, interval: float = 1.0
) -> tuple[float, float]:
    work = bench.workdir(f"latency-{settle}-{long_txn}-{interval}")
    stream = bench.stream(f"latency-{settle}-{int(long_txn)}-{int(interval * 1000)}")
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text('TRUNCATE "ORDERS"'))
    runner = Runner(load_config(_config(work, url, bench.redis_url, stream, settle, interval)))
    runner_thread = threading.Thread(target=runner.run, daemon=True)
    committed: dict[str, float] = {}
    arrived: dict[str, float] = {}
    stop = threading.Event()

    def consume() -> None:
        client = redis.Redis.from_url(bench.redis_url)
        last = "0"
        while not stop.is_set():
            for _name, entries in client.xread({stream: last}, block=100) or []:
                now = time.time()
                for entry_id, fields in entries:
                    last = entry_id
                    arrived.setdefault(orjson.loads(fields[b"event"])["subject"], now)
        client.close()

    def hold() -> None:
        with engine.connect() as conn:
            while not stop.is_set():
                with conn.begin():
                    conn.execute(text("INSERT INTO side_work (at) VALUES (clock_timestamp())"))
                    stop.wait(LONG_TXN)

    consumer = threading.Thread(target=consume, daemon=True)
    holder = threading.Thread(target=hold, daemon=True)
    runner_thread.start()
    consumer.start()
    time.sleep(1.0)  # the relay child is up and the first (empty) poll done
    if long_txn:
        holder.start()
    insert = text(
        'INSERT INTO "ORDERS" ("CUST_NAME", "AMOUNT", "CURRENCY", "ORDER_DATE", "STATUS", "PAID", "CHANGED_AT") '
        "VALUES ('Latency', 1.00, 'EUR', DATE '2026-11-29', 'NEW', 'N', now() AT TIME ZONE 'Europe/Amsterdam') "
        'RETURNING "ORDER_NO"'
    )
    try:
        with engine.connect() as conn:
            started = time.monotonic()
            n = 0
            while time.monotonic() - started < seconds:
                with conn.begin():
                    key = conn.execute(insert).scalar_one()
                committed[str(key)] = time.time()
                n += 1
                time.sleep(max(0.0, started + n / RATE - time.monotonic()))
        deadline = time.monotonic() + 30
        while len(arrived) < len(committed) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop.set()
        runner.stop.set()
        runner_thread.join(timeout=30)
        consumer.join(timeout=5)
        if holder.is_alive():
            holder.join(timeout=5)
        engine.dispose()
        bench.drop(stream)
        shutil.rmtree(work, ignore_errors=True)
    missing = set(committed) - set(arrived)
    if missing:
        raise RuntimeError(f"{len(missing)} of {len(committed)} changes never reached the stream")
    latencies = sorted((arrived[k] - committed[k]) * 1000 for k in committed)
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    p50, p99 = statistics.median(latencies), cuts[98]
    log(f"change latency, poll every {interval:g} s, settle {settle}, long transaction {'yes' if long_txn else 'no'}: "
        f"{len(latencies)} changes, p50 {p50:.0f} ms, p99 {p99:.0f} ms, max {latencies[-1]:.0f} ms")
    return p50, p99


def change_latency(bench: Bench, quick: bool) -> list[dict[str, Any]]:
    seconds = 1.5 if quick else 60.0  # issue 14: 50 changes/s for 60 s
    with postgres_database() as url:
        engine = create_engine(url)
        metadata = MetaData()
        orders_table(metadata, "ORDERS")
        metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE side_work (id serial PRIMARY KEY, at timestamptz)"))
        engine.dispose()
        figures = {
            (settle, long_txn, interval): _run(bench, url, settle=settle, long_txn=long_txn, seconds=seconds,
                                               interval=interval)
            for long_txn, interval in ((False, 1.0), (False, 0.1), (True, 1.0)) for settle in ("auto", "off")
        }
    results = []
    for long_txn, interval, measure in ((False, 1.0, "change_latency_p99_ms"),
                                        (False, 0.1, "change_latency_p99_100ms_ms"),
                                        (True, 1.0, "change_latency_p99_long_txn_ms")):
        value, baseline = figures[("auto", long_txn, interval)][1], figures[("off", long_txn, interval)][1]
        results.append({"measure": measure, "value": round(value, 1), "unit": "ms", "baseline": "settle_off",
                        "baseline_value": round(baseline, 1)})
    return results
