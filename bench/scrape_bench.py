"""Scrape measures: static pages/s against a Scrapy spider, browser pages/s and memory over a long run.

The fixture web UI runs in its own process for both sides, so the server's work
is not on the crawler's core or under its GIL. Each side logs in and walks the
`/orders` list by its "next" link, extracting and parsing every row's fields.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from adapters.scrape import ScrapeSource
from bench.services import log
from fixtures.webui.configs import app_list, login, orders_list
from straw.config_scrape import ScrapeSourceSpec

ROOT = Path(__file__).resolve().parent.parent
PAGE_SIZE = 10


@contextmanager
def webui_process(orders: int) -> Iterator[str]:
    server = subprocess.Popen(
        [sys.executable, "-m", "fixtures.webui", "--orders", str(orders), "--page-size", str(PAGE_SIZE)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert server.stdout is not None
        yield server.stdout.readline().strip()
    finally:
        server.terminate()
        server.wait(timeout=10)


def _spec(directory: Path, url: str, listing: dict[str, Any], mode: str) -> ScrapeSourceSpec:
    listing = {**listing, "pagination": {**listing["pagination"], "max_pages": 100_000}}
    session = login(directory)
    session.pop("session_file")  # every timed run logs in, as the spider does
    return ScrapeSourceSpec.model_validate({
        "name": "bench", "kind": "scrape", "mode": mode, "base_url": url, "entity": "order", "stream": "bench",
        "list": listing, "login": session, "debug_dir": str(directory / "debug"),
        "http": {"timeout": 30, "retries": 0},
    })


def _straw_static(spec: ScrapeSourceSpec, pages: int) -> float:
    source = ScrapeSource(spec)
    try:
        started = time.perf_counter()
        crawl = source.crawl()
        seconds = time.perf_counter() - started
    finally:
        source.close()
    if crawl.pages != pages:
        raise RuntimeError(f"straw read {crawl.pages} pages, expected {pages}")
    return seconds


def _scrapy(url: str, pages: int) -> float:
    done = subprocess.run(
        [sys.executable, "-m", "bench.scrape_spider", url], cwd=ROOT, capture_output=True, text=True, check=True
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["pages"] != pages:
        raise RuntimeError(f"scrapy read {result['pages']} pages, expected {pages}: {done.stderr[-500:]}")
    return float(result["seconds"])


def static_pages(tmp: Path, repeat: int, quick: bool) -> dict[str, Any]:
    pages = 100 if quick else 500
    with webui_process(pages * PAGE_SIZE) as url:
        spec = _spec(tmp, url, {k: v for k, v in orders_list().items()}, "static")
        _straw_static(spec, pages)  # warm-up: imports, connections, the server's first pages
        straw_s: list[float] = []
        scrapy_s: list[float] = []
        have_scrapy = importlib.util.find_spec("scrapy") is not None
        if not have_scrapy:
            log("scrape_static_pages_per_s: scrapy not installed (pip install -e '.[bench]'): no baseline")
        for rep in range(repeat):
            # Alternate the order so neither side always meets a warmer server.
            if have_scrapy and rep % 2:
                scrapy_s.append(_scrapy(url, pages))
            straw_s.append(_straw_static(spec, pages))
            if have_scrapy and not rep % 2:
                scrapy_s.append(_scrapy(url, pages))
    value = _median_rate("scrape_static_pages_per_s straw", pages, straw_s)
    result: dict[str, Any] = {"measure": "scrape_static_pages_per_s", "value": value, "unit": "pages/s"}
    if scrapy_s:
        result.update(baseline="scrapy", baseline_value=_median_rate("scrape_static_pages_per_s scrapy",
                                                                      pages, scrapy_s))
    return result


def _median_rate(label: str, pages: int, seconds: list[float]) -> float:
    rates = [pages / s for s in seconds]
    log(f"{label}: {', '.join(f'{r:,.0f}' for r in rates)} pages/s (median {statistics.median(rates):,.0f})")
    return statistics.median(rates)


class _RssSampler:
    """Resident memory of this process and its children (the browser), sampled while running."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now() -> int:
        import psutil  # here: the other measures of bench/run.py do not need it

        me = psutil.Process()
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except psutil.Error:  # a renderer that just exited
                continue
        return total

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.samples.append(self.now())

    def growth(self) -> float:
        """Bytes gained from early in the run (10-30 %) to its end (80-100 %), medians of each stretch.

        Medians over stretches, not last minus first: each browser context grows until it is
        replaced (every `RECYCLE_EVERY` pages), so memory is a sawtooth, and a single sample may
        catch an old renderer still exiting next to its successor.
        """
        n = len(self.samples)
        if n < 10:
            return 0.0
        early = statistics.median(self.samples[n // 10 : n * 3 // 10])
        late = statistics.median(self.samples[n * 8 // 10 :])
        return float(late - early)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


_browser_runs: dict[bool, dict[str, dict[str, Any]]] = {}


def browser(tmp: Path, quick: bool) -> dict[str, dict[str, Any]]:
    """Pages/s and memory growth of one long browser-mode run (shared by both measures of a bench run)."""
    if quick not in _browser_runs:
        _browser_runs[quick] = _browser(tmp, quick)
    return _browser_runs[quick]


def _browser(tmp: Path, quick: bool) -> dict[str, dict[str, Any]]:
    """One long browser-mode run over the JavaScript grid."""
    pages = 200 if quick else 1000
    warm = 50
    with webui_process(pages * PAGE_SIZE) as url:
        spec = _spec(tmp, url, app_list(), "browser")
        source = ScrapeSource(spec)
        try:
            short = ScrapeSource(spec.model_copy(update={"listing": spec.listing.model_copy(update={
                "pagination": spec.listing.pagination.model_copy(update={"max_pages": warm})
                if spec.listing.pagination else None})}), source.fetcher)
            short.crawl()  # warm-up: starts the browser, which the long run then reuses
            with _RssSampler() as memory:
                started = time.perf_counter()
                crawl = source.crawl()
                seconds = time.perf_counter() - started
        finally:
            source.close()
    if crawl.pages != pages:
        raise RuntimeError(f"browser mode read {crawl.pages} pages, expected {pages}")
    growth = memory.growth() / 2**20
    log(f"scrape_browser: {pages} pages in {seconds:.1f} s; RSS (python + browser processes) "
        f"{min(memory.samples) / 2**20:.0f}-{max(memory.samples) / 2**20:.0f} MB, trend {growth:+.0f} MB over the run")
    return {
        "scrape_browser_pages_per_s": {"measure": "scrape_browser_pages_per_s", "value": pages / seconds,
                                       "unit": "pages/s"},
        "scrape_browser_rss_growth_mb": {"measure": "scrape_browser_rss_growth_mb", "value": growth, "unit": "MB"},
    }
