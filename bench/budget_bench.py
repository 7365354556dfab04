"""Issue 16 measures: 300 sources on one PostgreSQL database (a private server, so the
baseline's 300 connections disturb no one).

- `idle_cpu_pct_300_sources`: CPU of the whole `straw run` process tree (runner and
  relay) over 60 s (quick: 15 s) with 300 idle timestamp sources at 5 s intervals, in %
  of one core, once every row has been delivered. Target: < 5 %.
- `poll_fanout_sources_per_s`: idle polls (nothing new) per second, each of the 300
  sources in turn, through the shared engine and budget; baseline the same sources
  each on an engine of its own (300 pools, 300 connections held).
"""

from __future__ import annotations

import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import yaml
from sqlalchemy import create_engine, text

from adapters.db.engine import make_engine
from adapters.db.poller import DbSource
from bench.services import Bench, log
from fixtures.private_sql import private_postgres
from straw.config import DbSourceSpec

ROOT = Path(__file__).resolve().parent.parent
SOURCES = 300
ROWS = 3
ITEM = {"key": ["id"], "fields": {"id": "integer", "name": "string", "changed_at": "datetime"}}


def _fill(url: str) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        for t in range(SOURCES):
            conn.execute(text(f"CREATE TABLE t{t:03d} (id INTEGER PRIMARY KEY, name VARCHAR(20), "
                              "changed_at TIMESTAMP(6))"))
            conn.execute(text(f"CREATE INDEX t{t:03d}_changed ON t{t:03d} (changed_at, id)"))
            conn.execute(text(f"INSERT INTO t{t:03d} SELECT i, 'row ' || i, "
                              f"TIMESTAMP '2026-11-29 08:00:00' + i * INTERVAL '1 second' "
                              f"FROM generate_series(1, {ROWS}) i"))
    engine.dispose()


def _source(url: str, t: int, stream: str = "unused", interval: float = 5.0) -> dict[str, Any]:
    return {"name": f"t{t:03d}", "url": url, "table": f"t{t:03d}", "mode": "timestamp",
            "timestamp_column": "changed_at", "key_column": "id", "entity": "item", "stream": stream,
            "poll_interval": interval}


def _tree_cpu(process: psutil.Process) -> float:
    """User + system seconds of a process and its living children."""
    total = 0.0
    for member in [process, *process.children(recursive=True)]:
        try:
            times = member.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def idle_cpu(
    bench: Bench, seconds: float, sources: int = SOURCES, interval: float = 5.0,
    measure: str = "idle_cpu_pct_300_sources",
) -> dict[str, Any]:
    """`sources` idle sources polled every `interval` s (issue 14's variant: 10 sources at 1 s)."""
    with private_postgres(max_connections=50) as url:
        _fill(url)
        work = bench.workdir("idle-cpu")
        stream = bench.stream("idle_cpu")
        config = {
            "instance": "bench",
            "redis": {"url": bench.redis_url},
            "outbox": {"path": str(work / "outbox.db")},
            "entities": {"item": ITEM},
            "sources": [_source(url, t, stream, interval) for t in range(sources)],
        }
        path = work / "straw.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        run = subprocess.Popen([sys.executable, "-m", "straw.cli", "run", "--config", str(path)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 120
            while int(bench.redis.xlen(stream)) < sources * ROWS:
                if run.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("straw run did not deliver every row")
                time.sleep(0.2)
            time.sleep(6.0)  # a full round of idle polls before the window opens
            tree = psutil.Process(run.pid)
            cpu, own, started = _tree_cpu(tree), sum(tree.cpu_times()[:2]), time.monotonic()
            time.sleep(seconds)
            used, wall = _tree_cpu(tree) - cpu, time.monotonic() - started
            own = sum(tree.cpu_times()[:2]) - own
        finally:
            run.send_signal(signal.SIGTERM)
            run.communicate(timeout=60)
        pct = used / wall * 100
        log(f"{measure}: {used:.2f} CPU s in {wall:.1f} s = {pct:.1f} % of a core "
            f"(runner {own / wall * 100:.1f} %, relay {(used - own) / wall * 100:.1f} %)")
    return {"measure": measure, "value": pct, "unit": "% of a core"}


def _round(sources: list[DbSource], positions: list[str | None]) -> float:
    started = time.perf_counter()
    for source, after in zip(sources, positions, strict=True):
        for _batch in source.read(after):
            raise RuntimeError("an idle poll found rows")
    return time.perf_counter() - started


def _rate(label: str, sources: list[DbSource], repeat: int) -> float:
    positions: list[str | None] = []
    for source in sources:  # the first poll reads the rows and reflects the table: not timed
        batches = list(source.read(None))
        positions.append(batches[-1].next_position)
    rounds = [_round(sources, positions) for _ in range(repeat)]
    rate = len(sources) / statistics.median(rounds)
    log(f"{label}: rounds {', '.join(f'{r * 1000:.0f} ms' for r in rounds)} -> {rate:,.0f} sources/s")
    return rate


def poll_fanout(bench: Bench, repeat: int) -> dict[str, Any]:
    del bench
    with private_postgres(max_connections=SOURCES + 20) as url:
        _fill(url)
        specs = [DbSourceSpec.model_validate(_source(url, t)) for t in range(SOURCES)]
        columns = ["id", "name"]
        shared = [DbSource(spec, columns) for spec in specs]
        try:
            value = _rate("shared engine, budget 2", shared, repeat)
        finally:
            for source in shared:
                source.close()
        separate = [DbSource(spec, columns, engine=make_engine(url)) for spec in specs]
        try:
            baseline = _rate("300 separate engines", separate, repeat)
        finally:
            for source in separate:
                source.close()
    return {"measure": "poll_fanout_sources_per_s", "value": value, "unit": "sources/s",
            "baseline": "separate_engines", "baseline_value": baseline}


if __name__ == "__main__":  # a profile of the idle polls alone: python -m bench.budget_bench
    import cProfile
    import pstats

    with private_postgres(max_connections=50) as url:
        _fill(url)
        sources = [DbSource(DbSourceSpec.model_validate(_source(url, t)), ["id", "name"]) for t in range(SOURCES)]
        positions = [list(s.read(None))[-1].next_position for s in sources]
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(5):
            _round(sources, positions)
        profile.disable()
        for source in sources:
            source.close()
    pstats.Stats(profile, stream=sys.stderr).sort_stats("cumulative").print_stats(40)
