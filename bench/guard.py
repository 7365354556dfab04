"""`python bench/run.py --guard`: regressions of cost growth, caught in CI in a minute or two.

Absolute speeds move with the machine and its load; how a cost grows with the
size of the work hardly does. Each check runs the same code on a small and a
big input (or straw and its ceiling) in this run and compares the two: a
one-line change that makes the snapshot diff quadratic, an idle poll that
scans the table, a browser that leaks pages, all change these ratios by
several times, while noise moves them by tens of percent. The thresholds sit
well below today's figures (bench/README.md, "Guard").
"""

from __future__ import annotations

import shutil
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench import db_bench, scrape_bench, sweep_bench
from bench.ceiling import prepare, sample_entries, xadd_pipelined
from bench.legacy import legacy_database
from bench.services import Bench, log
from bench.slice_bench import run_straw

BIG, SMALL = 200_000, 20_000  # 10x: enough to show growth, small enough for CI


@dataclass(frozen=True)
class Check:
    measure: str
    value: float
    baseline: str
    baseline_value: float
    ratio: float
    floor: float | None = None  # the ratio must stay at or above
    ceiling: float | None = None  # ... or at or below

    @property
    def passed(self) -> bool:
        if self.floor is not None and self.ratio < self.floor:
            return False
        return self.ceiling is None or self.ratio <= self.ceiling

    def line(self) -> str:
        bound = f">= {self.floor}" if self.floor is not None else f"<= {self.ceiling}"
        verdict = "ok  " if self.passed else "FAIL"
        return (f"{verdict} {self.measure}: {self.value:,.1f} vs {self.baseline} {self.baseline_value:,.1f} "
                f"= ratio {self.ratio:.2f} (must be {bound})")

    def as_json(self) -> dict[str, Any]:
        return {"measure": f"guard_{self.measure}", "value": round(self.ratio, 3), "unit": "ratio",
                "passed": self.passed, "figures": [round(self.value, 1), round(self.baseline_value, 1)]}


def _pair(found: list[dict[str, Any]], measure: str) -> tuple[float, float]:
    row = next(r for r in found if r["measure"] == measure)
    return float(row["value"]), float(row["baseline_value"])


def snapshot_diff(bench: Bench) -> list[Check]:
    """Rows/s on 200k vs 20k rows (flat today: ratio ~1); peak RSS likewise (a per-row leak grows it)."""
    found = db_bench.snapshot_diff(bench, BIG, SMALL)
    rate, small_rate = _pair(found, "snapshot_diff_rows_per_s")
    rss, small_rss = _pair(found, "snapshot_diff_peak_rss_mb")
    return [
        Check("snapshot_diff_rate_200k_vs_20k", rate, "20k", small_rate, rate / small_rate, floor=0.4),
        Check("snapshot_diff_rss_200k_vs_20k", rss, "20k", small_rss, rss / small_rss, ceiling=1.6),
    ]


def key_sweep(bench: Bench) -> list[Check]:
    found = sweep_bench.key_sweep(bench, BIG, SMALL)
    rate, small_rate = _pair(found, "key_sweep_rows_per_s")
    return [Check("key_sweep_rate_200k_vs_20k", rate, "20k", small_rate, rate / small_rate, floor=0.4)]


def idle_poll(bench: Bench) -> list[Check]:
    """An idle poll must not grow with the table (an index seek, not a scan): 200k vs 2k rows, ~1 today."""
    found = db_bench.idle_poll(bench, BIG, 2_000)
    return [Check("idle_poll_ms_200k_vs_2k", found["value"], "2k", found["baseline_value"],
                  found["value"] / found["baseline_value"], ceiling=3.0)]


def slice_vs_ceiling(bench: Bench) -> list[Check]:
    """The slice against the same run's pipelined-XADD ceiling: 35-48 % on a quiet machine, ~30 % loaded."""
    rows = 10_000
    with legacy_database(bench, "sqlite", 1000) as url:
        samples = sample_entries(bench, url, 1000)
    with legacy_database(bench, "sqlite", rows) as url:
        run_straw(bench, url, rows)  # warm-up
        straw = statistics.median(run_straw(bench, url, rows)[0] for _ in range(3))
    entries = prepare(samples, rows)
    xadd_pipelined(bench, entries[:1000])
    ceiling = statistics.median(xadd_pipelined(bench, entries) for _ in range(3))
    rate, top = rows / straw, rows / ceiling
    return [Check("slice_sqlite_vs_xadd_ceiling", rate, "xadd_ceiling", top, rate / top, floor=0.1)]


def browser_rss(bench: Bench) -> list[Check]:
    """RSS trend over a 200-page browser-mode crawl (after 50 warm-up pages): flat today (14-41 MB)."""
    if shutil.which("chromium") is None:
        log("guard: no chromium; browser RSS growth not checked (apt-get install chromium)")
        return []
    found = scrape_bench.browser(bench.tmp, quick=True)["scrape_browser_rss_growth_mb"]
    growth = float(found["value"])
    # A growth, not a ratio: compared with a fixed allowance of 150 MB (a leak of a page's DOM per page
    # over 200 pages is far above it; the trend's noise is tens of MB).
    return [Check("browser_rss_growth_mb_200_pages", growth, "allowance", 150.0, growth / 150.0, ceiling=1.0)]


CHECKS: dict[str, Callable[[Bench], list[Check]]] = {
    "snapshot_diff": snapshot_diff,
    "key_sweep": key_sweep,
    "idle_poll": idle_poll,
    "slice_vs_ceiling": slice_vs_ceiling,
    "browser_rss": browser_rss,
}


def run(bench: Bench, only: list[str] | None = None) -> list[Check]:
    checks: list[Check] = []
    for name in only or list(CHECKS):
        log(f"guard {name} …")
        found = CHECKS[name](bench)
        for check in found:
            log(check.line())
        checks += found
    return checks
