"""DB adapter measures (issue 3): idle poll cost, snapshot diff speed and memory, each mode end to end.

- `idle_poll_ms`: one timestamp-mode poll that finds nothing, on a 1,000,000-row
  indexed PostgreSQL table (quick: 100,000), median of 50; baseline the same on
  10,000 rows. Flat cost means the watermark query uses the index.
- `snapshot_diff_rows_per_s` / `snapshot_diff_peak_rss_mb`: a snapshot listing of
  1,000,000 rows (quick: 100,000) after 1 % were changed and 0.5 % deleted, timed
  alone in a fresh process (its peak RSS is the process's); baseline the same on
  100,000 rows (quick: 10,000). Flat RSS means memory does not grow with the table.
- `mode_<mode>_postgres_rows_per_s`: `Runner.run(once=True)` of the scale's rows
  into a fresh stream for each mode; baseline the slice's `per_row_xadd`.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import yaml
from sqlalchemy import MetaData, create_engine, text

from adapters.db import position
from bench.services import Bench, log, postgres_database
from bench.slice_bench import ORDER_ENTITY, ORDER_MAPPING, run_naive
from fixtures.legacy_orders import orders_table
from outbox.store import Outbox
from straw.config_load import load_config
from straw.runner import Runner, build_pipeline, freeze_startup_objects, poll

ROOT = Path(__file__).resolve().parent.parent
MODES = {
    "incrementing": {"incrementing_column": "ORDER_NO"},
    "timestamp": {"timestamp_column": "CHANGED_AT", "key_column": "ORDER_NO"},
    "snapshot": {},
}


def fill_orders(url: str, rows: int, name: str = "ORDERS") -> None:
    """The fixture's ORDERS schema (PK, index on CHANGED_AT), filled by the server itself: 1M rows in seconds."""
    started = time.perf_counter()
    engine = create_engine(url)
    try:
        metadata = MetaData()
        orders_table(metadata, name)
        metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(text(
                f'INSERT INTO "{name}" SELECT g, \'Customer \' || (g % 997), (g % 1000003) / 100.0, '
                "CASE WHEN g % 5 = 0 THEN 'USD' ELSE 'EUR' END, DATE '2026-11-01' + (g / 86400), "
                "CASE WHEN g % 4 = 0 THEN 'PAID' ELSE 'NEW' END, CASE WHEN g % 4 = 0 THEN 'J' ELSE 'N' END, "
                "CASE WHEN g % 3 = 0 THEN 'deliver to gate ' || (g % 7) END, "
                f"TIMESTAMP '2026-11-01 08:00' + g * INTERVAL '1 second' FROM generate_series(1, {rows}) g"
            ))
            conn.execute(text(f'ANALYZE "{name}"'))
    finally:
        engine.dispose()
    log(f"legacy {name}: {rows:,} rows written in {time.perf_counter() - started:.1f} s")


def write_config(directory: Path, *, db_url: str, redis_url: str, stream: str, mode: str,
                 table: str = "ORDERS", **extra: Any) -> Path:
    """`extra`: more keys of the source (e.g. `deletes`)."""
    source: dict[str, Any] = {
        "name": "erp-orders", "kind": "db", "url": db_url, "table": table, "mode": mode, **MODES[mode],
        "timezone": "Europe/Amsterdam", "entity": "order", "stream": stream, "mapping": ORDER_MAPPING, **extra,
    }
    config = {
        "instance": "bench", "redis": {"url": redis_url}, "outbox": {"path": str(directory / "outbox.db")},
        "entities": {"order": ORDER_ENTITY}, "sources": [source],
    }
    path = directory / "straw.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# --- idle_poll_ms -------------------------------------------------------------------


def _idle_poll_ms(bench: Bench, url: str, table: str, rows: int, repeat: int = 50) -> float:
    work = bench.workdir("idle")
    try:
        config = load_config(write_config(work, db_url=url, redis_url=bench.redis_url, stream="unused",
                                          mode="timestamp", table=table))
        pipeline = build_pipeline(config, config.sources[0])
        outbox = Outbox(config.outbox.path)
        try:
            engine = create_engine(url)
            with engine.connect() as conn:
                last = conn.execute(text(f'SELECT "CHANGED_AT", "ORDER_NO" FROM "{table}" '
                                         'ORDER BY "CHANGED_AT" DESC, "ORDER_NO" DESC LIMIT 1')).one()
            engine.dispose()
            # Caught up: the position stands at the last row, as after a long-running straw's last poll.
            outbox.append("erp-orders", "unused", [], [], position.encode((last[0], last[1])), 0)
            poll(pipeline, outbox)  # warm-up: reflection, first connection
            times = []
            for _ in range(repeat):
                started = time.perf_counter()
                found = poll(pipeline, outbox)
                times.append((time.perf_counter() - started) * 1000)
                if found:
                    raise RuntimeError(f"an idle poll found {found} rows")
        finally:
            outbox.close()
            pipeline.source.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    median = statistics.median(times)
    log(f"idle poll on {rows:,} rows: median {median:.2f} ms (min {min(times):.2f}, max {max(times):.2f})")
    return median


def idle_poll(bench: Bench, big: int, small: int = 10_000) -> dict[str, Any]:
    with postgres_database() as url:
        fill_orders(url, small, "ORDERS_SMALL")
        fill_orders(url, big, "ORDERS_BIG")
        baseline = _idle_poll_ms(bench, url, "ORDERS_SMALL", small)
        value = _idle_poll_ms(bench, url, "ORDERS_BIG", big)
    return {"measure": "idle_poll_ms", "value": value, "unit": "ms", "baseline": "idle_poll_ms_10k",
            "baseline_value": baseline}


# --- snapshot diff -------------------------------------------------------------------


def _worker(step: str, config: Path) -> dict[str, Any]:
    """`prime` or `diff` in a fresh process, so the diff's peak RSS is its own."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.db_bench", step, str(config)],
        cwd=ROOT, capture_output=True, text=True, check=False, timeout=1800,
    )
    if done.returncode != 0:
        raise RuntimeError(f"snapshot {step} failed:\n{done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _snapshot_diff(bench: Bench, url: str, table: str, rows: int) -> tuple[float, float]:
    """The Python digest's diff (`digest: python`): every row read and hashed here."""
    return _snapshot_diffs(bench, url, table, rows, ("python",))["python"]


def _snapshot_diffs(
    bench: Bench, url: str, table: str, rows: int, digests: tuple[str, ...], repeat: int = 1
) -> dict[str, tuple[float, float]]:
    """(rows/s, peak RSS MB) of a diff per `digest:` setting, each with an outbox of its own primed on the
    same table, then all facing the same change: 1 % of the rows updated, 0.5 % deleted.

    `repeat` > 1: the diffs of the settings take turns, each from a copy of its primed outbox, and the
    median rate counts (with the highest RSS): a busy machine moves single runs by tens of percent."""
    works = {kind: bench.workdir(f"snapshot-{kind}") for kind in digests}
    try:
        configs = {kind: write_config(work, db_url=url, redis_url=bench.redis_url, stream="unused", mode="snapshot",
                                      table=table, digest=kind) for kind, work in works.items()}
        for kind, config in configs.items():
            _worker("prime", config)
            _copy_outbox(works[kind], "outbox.db", "primed.db")
        engine = create_engine(url)
        with engine.begin() as conn:
            conn.execute(text(f'UPDATE "{table}" SET "STATUS" = \'SHIPPED\' WHERE "ORDER_NO" % 100 = 7'))
            conn.execute(text(f'DELETE FROM "{table}" WHERE "ORDER_NO" % 200 = 3'))
        engine.dispose()
        runs: dict[str, list[tuple[float, float]]] = {kind: [] for kind in digests}
        for _ in range(repeat):
            for kind, config in configs.items():
                _copy_outbox(works[kind], "primed.db", "outbox.db")
                runs[kind].append(_diffed(kind, rows, _worker("diff", config)))
        return {kind: (statistics.median(r for r, _ in found), max(m for _, m in found))
                for kind, found in runs.items()}
    finally:
        for work in works.values():
            shutil.rmtree(work, ignore_errors=True)


def _copy_outbox(work: Path, source: str, target: str) -> None:
    """A closed outbox's file (and its WAL, if the last close left one), replacing any at `target`."""
    for suffix in ("", "-wal", "-shm"):
        (work / f"{target}{suffix}").unlink(missing_ok=True)
        if suffix != "-shm" and (work / f"{source}{suffix}").exists():
            shutil.copyfile(work / f"{source}{suffix}", work / f"{target}{suffix}")


def _diffed(kind: str, rows: int, result: dict[str, Any]) -> tuple[float, float]:
    """A diff's (rows/s, peak RSS MB), logged as it comes; checked to have written exactly the change."""
    expected = rows // 100 + rows // 200  # 1 % upserted, 0.5 % deleted
    if abs(result["records"] - expected) > 2:
        raise RuntimeError(f"the {kind} digest's diff wrote {result['records']} records, expected {expected}")
    rate = result["rows"] / result["seconds"]
    log(f"snapshot diff ({kind} digest) of {rows:,} rows: {rate:,.0f} rows/s, {result['records']:,} records, "
        f"peak RSS {result['peak_rss_mb']:.0f} MB, {result['seconds']:.2f} s, straw CPU {result['cpu_s']:.2f} s, "
        f"load {os.getloadavg()[0]:.1f}")
    return rate, float(result["peak_rss_mb"])


def snapshot_db_digest(bench: Bench, big: int, small: int) -> list[dict[str, Any]]:
    """`snapshot_db_digest_rows_per_s`: the database's digests against the Python digest's diff of the same
    table in the same run; its peak RSS against its own on the small table (flat: no per-row growth)."""
    with postgres_database() as url:
        fill_orders(url, small, "ORDERS_SMALL")
        small_rss = _snapshot_diffs(bench, url, "ORDERS_SMALL", small, ("database",))["database"][1]
        fill_orders(url, big, "ORDERS_BIG")
        found = _snapshot_diffs(bench, url, "ORDERS_BIG", big, ("python", "database"), repeat=3)
    (rate, rss), (python_rate, _python_rss) = found["database"], found["python"]
    label = f"{small // 1000}k"
    return [
        {"measure": "snapshot_db_digest_rows_per_s", "value": rate, "unit": "rows/s",
         "baseline": "snapshot_python_digest_rows_per_s", "baseline_value": python_rate},
        {"measure": "snapshot_db_digest_peak_rss_mb", "value": rss, "unit": "MB",
         "baseline": f"snapshot_db_digest_peak_rss_mb_{label}", "baseline_value": small_rss},
    ]


def snapshot_diff(bench: Bench, big: int, small: int) -> list[dict[str, Any]]:
    return rate_and_rss("snapshot_diff", lambda url, table, rows: _snapshot_diff(bench, url, table, rows), big, small)


def rate_and_rss(
    name: str, run: Callable[[str, str, int], tuple[float, float]], big: int, small: int
) -> list[dict[str, Any]]:
    """`<name>_rows_per_s` and `<name>_peak_rss_mb` of `run(url, table, rows)` -> (rows/s, MB) on a big
    PostgreSQL table, each with the small table's figure as its baseline."""
    with postgres_database() as url:
        fill_orders(url, small, "ORDERS_SMALL")
        fill_orders(url, big, "ORDERS_BIG")
        small_rate, small_rss = run(url, "ORDERS_SMALL", small)
        rate, rss = run(url, "ORDERS_BIG", big)
    label = f"{small // 1000}k"
    return [
        {"measure": f"{name}_rows_per_s", "value": rate, "unit": "rows/s",
         "baseline": f"{name}_rows_per_s_{label}", "baseline_value": small_rate},
        {"measure": f"{name}_peak_rss_mb", "value": rss, "unit": "MB",
         "baseline": f"{name}_peak_rss_mb_{label}", "baseline_value": small_rss},
    ]


def _step(step: str, config_path: Path) -> dict[str, Any]:
    config = load_config(config_path)
    pipeline = build_pipeline(config, config.sources[0])
    outbox = Outbox(config.outbox.path)
    freeze_startup_objects()  # as `Runner.run` does once its pipelines are built
    try:
        if step == "diff":
            outbox.db.execute("DELETE FROM records")  # the first listing's records: not this step's
        started, cpu = time.perf_counter(), time.process_time()
        rows = poll(pipeline, outbox)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        records = outbox.backlog()
    finally:
        outbox.close()
        pipeline.source.close()
    return {"rows": rows, "seconds": seconds, "cpu_s": cpu, "records": records,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# --- each mode end to end ------------------------------------------------------------


def _run_mode(bench: Bench, url: str, mode: str, rows: int) -> float:
    work = bench.workdir(mode)
    stream = bench.stream(mode)
    try:
        config = load_config(write_config(work, db_url=url, redis_url=bench.redis_url, stream=stream, mode=mode))
        started = time.perf_counter()
        result = Runner(config).run(once=True)
        elapsed = time.perf_counter() - started
        if result.errors or result.rows_read != rows or bench.redis.xlen(stream) != rows:
            raise RuntimeError(f"{mode} run failed: read {result.rows_read} of {rows}; {result.errors}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        bench.drop(stream)
    return elapsed


def modes_postgres(bench: Bench, rows: int, repeat: int) -> list[dict[str, Any]]:
    seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
    naive: list[float] = []
    with postgres_database() as url:
        fill_orders(url, rows)
        _run_mode(bench, url, "timestamp", rows)  # warm-up
        for _ in range(repeat):
            naive.append(run_naive(bench, url, rows))
            for mode in MODES:
                seconds[mode].append(_run_mode(bench, url, mode, rows))
    baseline = statistics.median(rows / s for s in naive)
    out = []
    for mode, times in seconds.items():
        rate = statistics.median(rows / s for s in times)
        log(f"mode {mode} on PostgreSQL: {rate:,.0f} rows/s ({rate / baseline:.2f}x per_row_xadd)")
        out.append({"measure": f"mode_{mode}_postgres_rows_per_s", "value": rate, "unit": "rows/s",
                    "baseline": "per_row_xadd", "baseline_value": baseline})
    return out


def run_all(bench: Bench, *, quick: bool) -> list[dict[str, Any]]:
    """Every measure of this module once (each result dict fits bench/run.py's `Result(**…)`)."""
    big, small = (100_000, 10_000) if quick else (1_000_000, 100_000)
    rows, repeat = (10_000, 3) if quick else (100_000, 5)
    return [idle_poll(bench, big), *snapshot_diff(bench, big, small), *modes_postgres(bench, rows, repeat)]


def main(argv: list[str]) -> None:
    """`python -m bench.db_bench [--quick]`: JSON lines on stdout, progress on stderr (as bench/run.py).

    `python -m bench.db_bench prime|diff CONFIG` is the snapshot worker.
    """
    if argv and argv[0] in ("prime", "diff"):
        print(orjson.dumps(_step(argv[0], Path(argv[1]))).decode())
        return
    from contextlib import ExitStack

    from straw import logs

    logs.setup("WARNING")
    with ExitStack() as stack:
        for result in run_all(Bench(stack), quick="--quick" in argv):
            if result.get("baseline_value"):
                result["ratio"] = round(result["value"] / result["baseline_value"], 2)
                result["baseline_value"] = round(result["baseline_value"], 2)
            result["value"] = round(result["value"], 2)
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
