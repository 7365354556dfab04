"""The scrape source: one run reads the whole listing and hands it over as raw rows.

A web UI has no change position to read after: each run reads everything and
each row's position names the run and the row's place in it, so event ids are
unique per observation. The batches are *keyed* (see straw/source.py): the outbox
compares each item's key and content hash with earlier runs, so only new and
changed items become events, and a listing read to its end (`complete`) turns
items that vanished from it into `deleted` events.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from adapters.scrape import screenshot as shots
from adapters.scrape.crawl import Crawl, Crawler
from adapters.scrape.diagnose import Previous, Probe, hints_for, list_rows, on_detail_page, probe
from adapters.scrape.errors import LayoutDrift, ScrapeError
from adapters.scrape.extract import Row, Tables, rules, text_of
from adapters.scrape.fetch import Fetcher, describe_error
from adapters.scrape.fetch_browser import BrowserFetcher
from adapters.scrape.fetch_static import StaticFetcher
from adapters.scrape.hints import Hint
from adapters.scrape.page import Page
from straw.config_scrape import ScrapeMode, ScrapeSourceSpec
from straw.records import observed_now
from straw.source import RawBatch


def make_fetcher(spec: ScrapeSourceSpec) -> Fetcher:
    session = spec.login.session_file if spec.login else None
    if spec.mode is ScrapeMode.BROWSER:
        return BrowserFetcher(spec.name, spec.http, session, spec.browser_executable, spec.base_url)
    return StaticFetcher(spec.name, spec.http, session, spec.base_url)


class ScrapeSource:
    def __init__(self, spec: ScrapeSourceSpec, fetcher: Fetcher | None = None) -> None:
        self.name = spec.name
        self.spec = spec
        self.fetcher = fetcher or make_fetcher(spec)
        self.crawler = Crawler(spec, self.fetcher)
        self.columns = tuple(spec.item_fields())
        self.last: Crawl | None = None  # the latest run: pages read, and whether the listing was complete

    def crawl(self, limit: int | None = None) -> Crawl:
        try:
            self.last = self.crawler.run(limit)
        except ScrapeError:
            raise
        except Exception as exc:
            # Playwright's errors (a closed browser, a click that timed out…) fail this poll like any
            # unreadable page: reported, retried later; they must not stop the runner.
            if type(exc).__module__.split(".")[0] == "playwright":
                raise ScrapeError(f"source {self.name!r}: browser: {describe_error(exc)}") from exc
            raise
        return self.last

    def restore(self, memo: str | None) -> None:
        """Nothing to restore: a listing compares with the keyed state the outbox keeps."""

    def read(self, after: str | None, limit: int | None = None) -> Iterator[RawBatch]:
        """Every item of the listing (the first `limit` for a preview); `after` is not needed."""
        crawl = self.crawl(limit)
        run = observed_now()
        rows: list[list[Any]] = [[item.get(c) for c in self.columns] for item in crawl.items]
        positions = [orjson.dumps({"run": run, "n": n}).decode() for n in range(1, len(rows) + 1)]
        # A preview (`limit`) or a listing cut at max_pages has not seen every item: no deletes then.
        complete = crawl.complete and limit is None
        end = orjson.dumps({"run": run, "n": len(rows)}).decode()
        size = self.spec.batch_size
        starts = range(0, len(rows), size) if rows else range(1)
        for start in starts:
            last = start + size >= len(rows)
            yield RawBatch(
                self.columns,
                rows[start : start + size],
                positions[start : start + size],
                keyed=True,
                complete=complete and last,
                end=end if last else None,
            )

    def check(self) -> str:
        crawl = self.crawl(limit=max(self.spec.listing.min_rows, 1))
        return (
            f"{self.spec.mode} mode, {self.crawler.url(self.spec.listing.url)}: first page read, "
            f"{len(crawl.items)} row(s) checked, {len(self.columns)} field(s)"
        )

    def selectors(self) -> list[tuple[str, str, bool, int]]:
        """(field, where, required, rows it matched nothing in during the last run): for `straw preview`."""
        unmatched = self.last.unmatched if self.last else {}
        rules = [*self.spec.listing.fields.items(), *(self.spec.detail.fields.items() if self.spec.detail else [])]
        return [(name, rule.describe(), rule.required, unmatched.get(name, 0)) for name, rule in rules]

    def diagnose(self, exc: BaseException, previous: Previous | None = None) -> list[Probe] | None:
        """After layout drift: what every selector finds on the page it was found on (`straw preview`);
        `previous`: values each field published before, which its hints look for."""
        return probe(self.spec, exc, previous) if isinstance(exc, LayoutDrift) else None

    def hints(self, previous: Previous | None = None) -> dict[str, list[Hint]]:
        """After a preview: for each list field that matched nothing in a row of the first page, the
        elements of that row most like it."""
        page = self.crawler.first_page
        if page is None:
            return {}
        tables = Tables()
        rows = [Row(node, tables) for node in list_rows(self.spec, page)]
        found: dict[str, list[Hint]] = {}
        for rule in rules(self.spec.listing.fields):
            read = [text_of(n) for n in (rule.node(r) for r in rows[:20]) if n is not None]
            hints = hints_for(rule, rows, read, previous or {})
            if hints:
                found[rule.name] = hints
        return found

    def screenshot(self, out: Path, exc: BaseException | None = None) -> shots.Marked:
        """`straw preview --screenshot`: the page the preview read (after layout drift: the page it was
        found on) with each field's matches outlined; what matched nothing is listed in a banner."""
        if isinstance(exc, LayoutDrift):
            page = Page(exc.url, exc.html)
            on_detail = on_detail_page(self.spec, exc, list_rows(self.spec, page))
        elif self.crawler.first_page is not None:
            page, on_detail = self.crawler.first_page, False
        else:
            raise ScrapeError(f"source {self.name!r}: no list page was read: nothing to show in a screenshot")
        return shots.take(self.spec, page, on_detail, out)

    def close(self) -> None:
        self.fetcher.close()
