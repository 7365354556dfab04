"""straw's benchmarks: `python bench/run.py [--quick] [MEASURE…]`.

stdout carries one JSON object per measure and nothing else; everything else
(progress, service choice, per-repetition times) goes to stderr. See
bench/README.md for what each measure means.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import threading
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

# `python bench/run.py` puts bench/ first on sys.path; the packages live one level up.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import budget_bench, db_bench, guard, latency_bench, loader_bench, nats_bench, scrape_bench, sweep_bench
from bench.ceiling import prepare, sample_entries, xadd_pipelined
from bench.durability_bench import replicated_slice
from bench.legacy import legacy_database
from bench.services import Bench, Watchdog, log
from bench.slice_bench import run_naive, run_straw
from straw import logs


@dataclass(frozen=True)
class Scale:
    rows: int
    repeat: int
    ceiling_samples: int = 2000
    timeout: float = 900.0  # per measure: a hung run is interrupted, cleaned up and reported
    idle_seconds: float = 60.0  # idle_cpu_pct_300_sources: how long the CPU is measured


FULL = Scale(rows=100_000, repeat=5)
QUICK = Scale(rows=10_000, repeat=3, ceiling_samples=1000, timeout=120.0, idle_seconds=15.0)


@dataclass(frozen=True)
class Result:
    measure: str
    value: float
    unit: str
    baseline: str | None = None
    baseline_value: float | None = None

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"measure": self.measure, "value": round(self.value, 1), "unit": self.unit}
        if self.baseline is not None and self.baseline_value:
            out["baseline"] = self.baseline
            out["baseline_value"] = round(self.baseline_value, 1)
            out["ratio"] = round(self.value / self.baseline_value, 2)
        return out


def _rates(label: str, rows: int, seconds: list[float], unit: str = "rows/s") -> float:
    """Median throughput over the repetitions: robust to one disturbed run on a shared machine."""
    rates = [rows / s for s in seconds]
    log(f"{label}: {', '.join(f'{r:,.0f}' for r in rates)} {unit} (median {statistics.median(rates):,.0f})")
    return statistics.median(rates)


def slice_measure(backend: str) -> Callable[[Bench, Scale], Result]:
    def measure(bench: Bench, scale: Scale) -> Result:
        name = f"slice_{'postgres' if backend == 'postgresql' else backend}_rows_per_s"
        straw_s: list[float] = []
        naive_s: list[float] = []
        with legacy_database(bench, backend, scale.rows) as url:
            run_straw(bench, url, scale.rows)  # warm-up: imports, page cache, first connections
            for rep in range(scale.repeat):
                # Alternate the order so neither side always runs on a warmer cache.
                if rep % 2:
                    straw_s.append(run_straw(bench, url, scale.rows)[0])
                    naive_s.append(run_naive(bench, url, scale.rows))
                else:
                    naive_s.append(run_naive(bench, url, scale.rows))
                    straw_s.append(run_straw(bench, url, scale.rows)[0])
        value = _rates(f"{name} straw", scale.rows, straw_s)
        baseline = _rates(f"{name} per_row_xadd", scale.rows, naive_s)
        return Result(name, value, "rows/s", "per_row_xadd", baseline)

    return measure


def xadd_ceiling(bench: Bench, scale: Scale) -> Result:
    with legacy_database(bench, "sqlite", scale.ceiling_samples) as url:
        samples = sample_entries(bench, url, scale.ceiling_samples)
    sizes = [sum(len(k) + len(v) for k, v in f.items()) for f in samples]
    log(f"xadd_ceiling: {len(samples)} real entries, {statistics.mean(sizes):.0f} bytes of fields on average")
    entries = prepare(samples, scale.rows)
    xadd_pipelined(bench, entries[:1000])  # warm-up
    seconds = [xadd_pipelined(bench, entries) for _ in range(scale.repeat)]
    return Result("xadd_ceiling_per_s", _rates("xadd_ceiling_per_s", scale.rows, seconds, "entries/s"), "entries/s")


def bus_nats(bench: Bench, scale: Scale) -> list[dict[str, Any]]:
    """The slice into NATS JetStream, and nats-py's own pipelined publish of the same messages (bench/nats_bench.py)."""
    if not nats_bench.available():
        raise RuntimeError(f"no NATS at {nats_bench.NATS_URL}; set STRAW_BENCH_NATS_URL (nats-server -js)")
    with legacy_database(bench, "sqlite", scale.rows) as url:
        straw_s, ceiling_s = nats_bench.measure(bench, url, scale.rows, scale.repeat)
    ceiling = _rates("nats_publish_ceiling_per_s", scale.rows, ceiling_s, "messages/s")
    value = _rates("bus_nats_rows_per_s straw", scale.rows, straw_s)
    return [
        {"measure": "bus_nats_rows_per_s", "value": value, "unit": "rows/s",
         "baseline": "nats_publish_ceiling_per_s", "baseline_value": ceiling},
        {"measure": "nats_publish_ceiling_per_s", "value": ceiling, "unit": "messages/s"},
    ]


_MADE: dict[tuple[Callable[..., Any], int], list[dict[str, Any]]] = {}


def _one_of(producer: Callable[[Bench, Scale], list[dict[str, Any]]], measure: str) -> Callable[[Bench, Scale], Result]:
    """One measure of a producer that yields several from one costly run (made once per bench run)."""

    def pick(bench: Bench, scale: Scale) -> Result:
        key = (producer, id(bench))
        if key not in _MADE:
            _MADE[key] = producer(bench, scale)
        return Result(**next(r for r in _MADE[key] if r["measure"] == measure))

    return pick


def _db_big(scale: Scale) -> tuple[int, int]:
    return (100_000, 10_000) if scale is QUICK else (1_000_000, 100_000)


def _snapshots(bench: Bench, scale: Scale) -> list[dict[str, Any]]:
    return db_bench.snapshot_diff(bench, *_db_big(scale))


def _db_digests(bench: Bench, scale: Scale) -> list[dict[str, Any]]:
    return db_bench.snapshot_db_digest(bench, *_db_big(scale))


def _latency(bench: Bench, scale: Scale) -> list[dict[str, Any]]:
    return latency_bench.change_latency(bench, quick=scale is QUICK)


def _sweeps(bench: Bench, scale: Scale) -> list[dict[str, Any]]:
    return sweep_bench.key_sweep(bench, *_db_big(scale))


def _takeovers(bench: Bench, scale: Scale) -> list[dict[str, Any]]:
    from bench import handover_bench  # a measure added apart (session 5)

    return handover_bench.takeover_rebuild(bench, *_db_big(scale))


def _rabbitmq(bench: Bench, scale: Scale) -> list[dict[str, Any]]:
    from bench import rabbitmq_bench  # only a RabbitMQ measure needs rstream and a broker

    return rabbitmq_bench.bus_rabbitmq(bench, scale.rows, scale.repeat)


def _modes(bench: Bench, scale: Scale) -> list[dict[str, Any]]:
    return db_bench.modes_postgres(bench, scale.rows, scale.repeat)


MEASURES: dict[str, Callable[[Bench, Scale], Result]] = {
    "slice_sqlite_rows_per_s": slice_measure("sqlite"),
    "slice_postgres_rows_per_s": slice_measure("postgresql"),
    "slice_sqlite_replicated_rows_per_s": lambda bench, scale: Result(
        **replicated_slice(bench, scale.rows, scale.repeat)),
    "xadd_ceiling_per_s": xadd_ceiling,
    "idle_poll_ms": lambda bench, scale: Result(**db_bench.idle_poll(bench, _db_big(scale)[0])),
    "snapshot_diff_rows_per_s": _one_of(_snapshots, "snapshot_diff_rows_per_s"),
    "snapshot_diff_peak_rss_mb": _one_of(_snapshots, "snapshot_diff_peak_rss_mb"),
    "snapshot_db_digest_rows_per_s": _one_of(_db_digests, "snapshot_db_digest_rows_per_s"),
    "snapshot_db_digest_peak_rss_mb": _one_of(_db_digests, "snapshot_db_digest_peak_rss_mb"),
    "key_sweep_rows_per_s": _one_of(_sweeps, "key_sweep_rows_per_s"),
    "key_sweep_peak_rss_mb": _one_of(_sweeps, "key_sweep_peak_rss_mb"),
    "takeover_rebuild_entries_per_s": _one_of(_takeovers, "takeover_rebuild_entries_per_s"),
    "takeover_rebuild_peak_rss_mb": _one_of(_takeovers, "takeover_rebuild_peak_rss_mb"),
    **{
        f"mode_{mode}_postgres_rows_per_s": _one_of(_modes, f"mode_{mode}_postgres_rows_per_s")
        for mode in ("incrementing", "timestamp", "snapshot")
    },
    "change_latency_p99_ms": _one_of(_latency, "change_latency_p99_ms"),
    "change_latency_p99_100ms_ms": _one_of(_latency, "change_latency_p99_100ms_ms"),
    "change_latency_p99_long_txn_ms": _one_of(_latency, "change_latency_p99_long_txn_ms"),
    "scrape_static_pages_per_s": lambda bench, scale: Result(
        **scrape_bench.static_pages(bench.tmp, scale.repeat, quick=scale is QUICK)),
    "scrape_browser_pages_per_s": lambda bench, scale: Result(
        **scrape_bench.browser(bench.tmp, quick=scale is QUICK)["scrape_browser_pages_per_s"]),
    "scrape_browser_rss_growth_mb": lambda bench, scale: Result(
        **scrape_bench.browser(bench.tmp, quick=scale is QUICK)["scrape_browser_rss_growth_mb"]),
    "scrape_static_real_pages_per_s": lambda bench, scale: Result(
        **scrape_bench.static_real(bench.tmp, scale.repeat, quick=scale is QUICK)),
    "scrape_browser_real_pages_per_s": lambda bench, scale: Result(
        **scrape_bench.browser_real(bench.tmp, quick=scale is QUICK)["scrape_browser_real_pages_per_s"]),
    "scrape_browser_real_rss_growth_mb": lambda bench, scale: Result(
        **scrape_bench.browser_real(bench.tmp, quick=scale is QUICK)["scrape_browser_real_rss_growth_mb"]),
    "idle_cpu_pct_300_sources": lambda bench, scale: Result(**budget_bench.idle_cpu(bench, scale.idle_seconds)),
    "poll_fanout_sources_per_s": lambda bench, scale: Result(**budget_bench.poll_fanout(bench, scale.repeat)),
    "idle_cpu_pct_10_sources_1s": lambda bench, scale: Result(**budget_bench.idle_cpu(
        bench, scale.idle_seconds, sources=10, interval=1.0, measure="idle_cpu_pct_10_sources_1s")),
    "bus_rabbitmq_rows_per_s": _one_of(_rabbitmq, "bus_rabbitmq_rows_per_s"),
    "rabbitmq_publish_ceiling_per_s": _one_of(_rabbitmq, "rabbitmq_publish_ceiling_per_s"),
    "bus_nats_rows_per_s": _one_of(bus_nats, "bus_nats_rows_per_s"),
    "nats_publish_ceiling_per_s": _one_of(bus_nats, "nats_publish_ceiling_per_s"),
    "loader_sql_postgres_records_per_s": lambda bench, scale: Result(
        **loader_bench.sql_postgres(bench, scale.rows, min(scale.repeat, 3))),
    "loader_jsonl_records_per_s": lambda bench, scale: Result(**loader_bench.jsonl(bench, scale.rows, scale.repeat)),
}


def _alive() -> set[str]:
    """This process's threads and child processes, by name."""
    children = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children")
    pids = children.read_text().split() if children.exists() else []
    threads = {f"thread {t.name} ({type(t).__module__}.{type(t).__qualname__})" for t in threading.enumerate()}
    return threads | {f"child process {pid} ({_command(pid)})" for pid in pids}


def _command(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:80].strip()
    except OSError:
        return "ended"


def _left_behind(name: str, before: set[str]) -> None:
    """Say what a measure left running: the measures after it share this process, so its threads and
    children would slow them."""
    left = sorted(_alive() - before)
    if left:
        log(f"{name} left running: {', '.join(left)}")


def _summary(results: list[Result]) -> None:
    ceiling = next((r.value for r in results if r.measure == "xadd_ceiling_per_s"), None)
    for r in results:
        parts = [f"{r.measure}: {r.value:,.0f} {r.unit}"]
        if r.baseline_value:
            parts.append(f"{r.value / r.baseline_value:.2f}x {r.baseline}")
        if ceiling and r.unit == "rows/s":
            parts.append(f"{r.value / ceiling:.0%} of the XADD ceiling")
        log("; ".join(parts))


def _json_output() -> TextIO:
    """The real stdout, for the JSON lines alone; file descriptor 1 itself now points at stderr.

    So anything else that prints (a library, a stray log, a child process) lands on
    stderr, never in the JSON stream.
    """
    sys.stdout.flush()
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return out


def _exit_on_sigterm(_signum: int, _frame: Any) -> None:
    raise SystemExit(143)  # unwinds through every cleanup: streams, scratch database, temp dir


def _guard(only: list[str], parser: argparse.ArgumentParser) -> int:
    unknown = [c for c in only if c not in guard.CHECKS]
    if unknown:
        parser.error(f"unknown check {', '.join(unknown)}; choose from {', '.join(guard.CHECKS)}")
    out = _json_output()
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    logs.setup("WARNING")
    try:
        with ExitStack() as stack:
            checks = guard.run(Bench(stack), only)
            for check in checks:
                print(json.dumps(check.as_json()), file=out, flush=True)
    finally:
        out.close()
    failed = [c for c in checks if not c.passed]
    for check in failed:
        log(f"bench guard: {check.line()}; see bench/README.md, Guard")
    log(f"bench guard: {len(checks) - len(failed)} of {len(checks)} checks passed")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="10,000 rows and fewer repetitions (< 1 minute)")
    parser.add_argument("--guard", action="store_true",
                        help=f"only the cost-growth checks CI runs (bench/guard.py): {', '.join(guard.CHECKS)}")
    parser.add_argument("measures", nargs="*", metavar="MEASURE", help=f"any of: {', '.join(MEASURES)} (default: all)")
    args = parser.parse_args(argv)
    if args.guard:
        return _guard(args.measures, parser)
    unknown = [m for m in args.measures if m not in MEASURES]
    if unknown:
        parser.error(f"unknown measure {', '.join(unknown)}; choose from {', '.join(MEASURES)}")
    scale = QUICK if args.quick else FULL
    out = _json_output()
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    logs.setup("WARNING")
    load = os.getloadavg()[0]
    log(f"{platform.python_implementation()} {platform.python_version()}, {os.cpu_count()} CPUs, "
        f"load {load:.2f}; {scale.rows:,} rows x {scale.repeat}")
    if load > 0.5:
        log("the machine is busy: figures will be noisy (see bench/README.md, Noise)")
    failed = False
    results: list[Result] = []
    try:
        with ExitStack() as stack:
            bench = Bench(stack)
            log(f"redis round trip (PING): {bench.round_trip_us():.0f} µs; it sets the pace of per_row_xadd")
            for name in args.measures or list(MEASURES):
                log(f"{name} …")
                before = _alive()
                dog = Watchdog(scale.timeout, name)
                try:
                    with dog:
                        result = MEASURES[name](bench, scale)
                except (Exception, KeyboardInterrupt) as exc:  # one measure failing must not hide the others
                    if isinstance(exc, KeyboardInterrupt) and not dog.fired:
                        raise
                    log(f"{name} FAILED: {type(exc).__name__}: {str(exc) or 'timed out'}")
                    failed = True
                    continue
                results.append(result)
                print(json.dumps(result.as_json()), file=out, flush=True)
                _left_behind(name, before)
    finally:
        out.close()
    _summary(results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
