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
from functools import cache
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


def _scrapy(url: str, pages: int, *spider: str) -> float:
    done = subprocess.run(
        [sys.executable, "-m", "bench.scrape_spider", url, *spider], cwd=ROOT, capture_output=True, text=True,
        check=True,
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


@cache  # both measures of a bench run share the one long run
def browser(tmp: Path, quick: bool) -> dict[str, dict[str, Any]]:
    """Pages/s and memory growth of one long browser-mode run over the JavaScript grid."""
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


# -- realistic page weight: /real/list (25 rows, ~75 KB, a stylesheet and a script) and its detail pages --------

REAL_PAGE_SIZE = 25


def _real_spec(directory: Path, url: str, mode: str, concurrency: int) -> ScrapeSourceSpec:
    return ScrapeSourceSpec.model_validate({
        "name": "bench-real", "kind": "scrape", "mode": mode, "base_url": url, "entity": "order", "stream": "bench",
        "debug_dir": str(directory / "debug"), "http": {"timeout": 30, "retries": 0, "concurrency": concurrency},
        "list": {
            "url": "real/list", "rows": "table.grid tr.item",
            "fields": {
                "order_no": {"css": "td a", "parse": "integer", "required": True},
                "customer": {"column": "Customer"},
                "order_date": {"column": "Date", "parse": {"type": "date", "format": "%d-%m-%Y"}},
                "amount": {"css": "td.amt", "parse": "decimal", "required": True},
            },
            "pagination": {"next": "a.next", "max_pages": 100_000},
        },
        "detail": {"link": "td a", "fields": {"status": {"css": "#status", "required": True}, "note": "#note"}},
    })


def _real_crawl(source: ScrapeSource, lists: int) -> tuple[float, int]:
    """(seconds, pages read: list pages and detail pages) of one crawl."""
    started = time.perf_counter()
    crawl = source.crawl()
    seconds = time.perf_counter() - started
    if crawl.pages != lists or len(crawl.items) != lists * REAL_PAGE_SIZE:
        raise RuntimeError(f"read {crawl.pages} list pages and {len(crawl.items)} items, expected {lists} and "
                           f"{lists * REAL_PAGE_SIZE}")
    if any(item["status"] is None for item in crawl.items):
        raise RuntimeError("a detail page was not read")
    return seconds, crawl.pages + len(crawl.items)


def static_real(tmp: Path, repeat: int, quick: bool) -> dict[str, Any]:
    """Static mode on realistic pages (list and detail) against the Scrapy spider on the same pages."""
    lists = 8 if quick else 40
    with webui_process(lists * REAL_PAGE_SIZE) as url:
        source = ScrapeSource(_real_spec(tmp, url, "static", 4))
        straw_s: list[float] = []
        scrapy_s: list[float] = []
        pages = lists * (REAL_PAGE_SIZE + 1)
        try:
            _real_crawl(source, lists)  # warm-up
            have_scrapy = importlib.util.find_spec("scrapy") is not None
            if not have_scrapy:
                log("scrape_static_real_pages_per_s: scrapy not installed (pip install -e '.[bench]'): no baseline")
            for rep in range(repeat):
                if have_scrapy and rep % 2:
                    scrapy_s.append(_scrapy(url, pages, "real"))
                straw_s.append(_real_crawl(source, lists)[0])
                if have_scrapy and not rep % 2:
                    scrapy_s.append(_scrapy(url, pages, "real"))
        finally:
            source.close()
    result: dict[str, Any] = {"measure": "scrape_static_real_pages_per_s",
                              "value": _median_rate("scrape_static_real_pages_per_s straw", pages, straw_s),
                              "unit": "pages/s"}
    if scrapy_s:
        result.update(baseline="scrapy", baseline_value=_median_rate("scrape_static_real_pages_per_s scrapy",
                                                                      pages, scrapy_s))
    return result


BROWSER_CONCURRENCY = 4


@cache  # both measures of a bench run share the one pair of crawls
def browser_real(tmp: Path, quick: bool) -> dict[str, dict[str, Any]]:
    """Browser mode on realistic pages: detail pages rendered `BROWSER_CONCURRENCY` at once, against the
    same crawl at concurrency 1 in the same run; RSS (this process and the browser's) sampled over the
    concurrent crawl of 1,000+ pages (quick: ~100)."""
    lists = 4 if quick else 40
    pages = lists * (REAL_PAGE_SIZE + 1)
    with webui_process(lists * REAL_PAGE_SIZE) as url:
        one = ScrapeSource(_real_spec(tmp, url, "browser", 1))
        many = ScrapeSource(_real_spec(tmp, url, "browser", BROWSER_CONCURRENCY))
        try:
            warm = ScrapeSource(_real_spec(tmp, url, "browser", BROWSER_CONCURRENCY).model_copy(
                update={"listing": _real_spec(tmp, url, "browser", 1).listing.model_copy(update={
                    "pagination": None})}), many.fetcher)
            warm.crawl()  # starts the browser; the timed runs reuse it
            ScrapeSource(_real_spec(tmp, url, "browser", 1).model_copy(update={"listing": warm.spec.listing}),
                         one.fetcher).crawl()
            baseline_s, _ = _real_crawl(one, lists)
            with _RssSampler() as memory:
                seconds, _ = _real_crawl(many, lists)
        finally:
            one.close()
            many.close()
    growth = memory.growth() / 2**20
    log(f"scrape_browser_real: {pages} pages; concurrency {BROWSER_CONCURRENCY}: {seconds:.1f} s, concurrency 1: "
        f"{baseline_s:.1f} s; RSS {min(memory.samples) / 2**20:.0f}-{max(memory.samples) / 2**20:.0f} MB, trend "
        f"{growth:+.0f} MB over the concurrent run")
    return {
        "scrape_browser_real_pages_per_s": {
            "measure": "scrape_browser_real_pages_per_s", "value": pages / seconds, "unit": "pages/s",
            "baseline": "concurrency_1", "baseline_value": pages / baseline_s},
        "scrape_browser_real_rss_growth_mb": {"measure": "scrape_browser_real_rss_growth_mb", "value": growth,
                                              "unit": "MB"},
    }
