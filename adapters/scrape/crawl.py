"""Navigation: log in when needed, walk the list pages, read each row, visit detail pages.

The whole listing is read before anything is returned: a run that hits layout
drift on page 7 must not have delivered pages 1-6 (the position would then
say "done" for a half-read listing).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from itertools import islice
from typing import Any
from urllib.parse import urljoin

import structlog
from lxml import etree

from adapters.scrape.errors import Challenged, LayoutDrift, LoginFailed, SessionExpired
from adapters.scrape.extract import (
    MISSING,
    Row,
    Rule,
    Tables,
    Unusable,
    compile_query,
    locator_query,
    rules,
    text_of,
)
from adapters.scrape.fetch import Fetcher, postback_args, private_folder, write_private
from adapters.scrape.hints import describe, nearest
from adapters.scrape.login import same_page
from adapters.scrape.page import Node, Page, css, elements, strings
from straw.config_scrape import Locator, LoginWhen, ScrapeSourceSpec


def log() -> Any:
    # Not cached at import: logs.setup() may be re-run (the CLI, tests) and point at another stream.
    return structlog.get_logger("straw.scrape")


_DETAIL = "\x00detail"  # an item's detail URL while the listing is read; never a configured name


@dataclass
class Crawl:
    items: list[dict[str, Any]]
    complete: bool  # every list page was read: items absent from it are really gone
    pages: int
    unmatched: dict[str, int]  # field -> how many rows its selector matched nothing in


class Crawler:
    def __init__(self, spec: ScrapeSourceSpec, fetcher: Fetcher) -> None:
        self.spec = spec
        self.fetcher = fetcher
        self.rows = locator_query(spec.listing.rows)
        self.list_rules = rules(spec.listing.fields, spec.null_if, spec.zone)
        self.detail_rules = rules(spec.detail.fields, spec.null_if, spec.zone) if spec.detail else []
        link = spec.detail.link if spec.detail else None
        # A row without its detail link cannot be read completely: that is drift, like a required field.
        self.detail_link = (
            Rule("detail link", link.model_copy(update={"attr": link.attr or "href", "required": True}))
            if link else None
        )
        pagination = spec.listing.pagination
        self.next = pagination.next if pagination else None
        self.pages = pagination.pages if pagination else None
        self._next_query = locator_query(self.next) if self.next else None
        self._pages_query = compile_query(self.pages.css, self.pages.xpath) if self.pages else None
        self.max_pages = pagination.max_pages if pagination else 1
        self._unmatched: dict[str, int] = {}
        self._lock = threading.Lock()  # detail pages are read by several threads
        self._login_lock = threading.Lock()
        self._logins = 0  # logins so far: a challenged request logs in only if no one did meanwhile
        self._writes = True  # False in a preview or check: no session file, no debug page
        self.first_page: Page | None = None  # the listing's first page in the last run (preview's screenshot)

    def url(self, path: str) -> str:
        return urljoin(self.spec.base_url, path)

    # -- the run ---------------------------------------------------------------------------

    def run(self, limit: int | None = None) -> Crawl:
        # A preview or check (`limit`) writes nothing: no debug page, no session file.
        self._writes = limit is None
        self.fetcher.begin()
        try:
            try:
                crawl = self._run(limit)
            except LayoutDrift as drift:
                if self._writes:
                    self._save_debug(drift)
                raise
            if self.spec.login is not None and self._writes:
                self.fetcher.save_session()  # the server may have renewed the session cookie meanwhile
            return crawl
        finally:
            self.fetcher.end()

    def _run(self, limit: int | None) -> Crawl:
        login = self.spec.login
        if login is not None and login.when is LoginWhen.ALWAYS:
            self._login()
        try:
            return self._crawl(limit)
        except SessionExpired:
            pass
        # Challenged while following a pager link or postback: that place in the listing cannot be
        # asked for again on its own. Log in once, start over.
        self._login()
        try:
            return self._crawl(limit)
        except SessionExpired as exc:
            raise self._still_challenged(exc) from None

    def _still_challenged(self, exc: SessionExpired) -> LoginFailed:
        return LoginFailed(
            f"{exc} right after logging in; check the credentials in `login.fields` and that `login.success` "
            "matches only a logged-in page"
        )

    def _login(self) -> None:
        login = self.spec.login
        assert login is not None  # SessionExpired is raised only when a login is configured
        log().info("logging in", source=self.spec.name, url=self.url(login.url))
        try:
            page = self.fetcher.login(login, self.url(login.url))
        except Challenged as exc:
            raise LoginFailed(f"{exc}: the login page itself refuses us; check `login.url`") from None
        success = login.success
        ok = (success.url_contains is None or success.url_contains in page.url) and (
            success.selector is None or bool(locator_query(success.selector)(page.tree))
        )
        if not ok:
            check = f"selector {success.selector}" if success.selector else f"URL containing {success.url_contains!r}"
            raise LoginFailed(
                f"source {self.spec.name!r}: login at {self.url(login.url)} did not succeed (expected {check}, "
                f"got {page.url}); check the credentials in `login.fields`"
            )
        self._logins += 1
        if self._writes:
            self.fetcher.save_session()

    def _open(self, url: str, wait: Locator | None = None) -> Page:
        """GET `url`; challenged (401/403, sent to the login page, shown the login form): log in once, ask again."""
        if self.spec.login is None:
            return self._checked(self.fetcher.open(url), wait, url)
        logins = self._logins
        try:
            return self._checked(self._challenge(lambda: self.fetcher.open(url)), wait, url)
        except SessionExpired:
            pass
        with self._login_lock:  # detail pages are fetched by several threads; one logs in
            if self._logins == logins:
                self._login()
        try:
            return self._checked(self._challenge(lambda: self.fetcher.open(url)), wait, url)
        except SessionExpired as exc:
            raise self._still_challenged(exc) from None

    def _challenge(self, fetch: Callable[[], Page]) -> Page:
        try:
            return fetch()
        except Challenged as exc:
            if self.spec.login is None:
                raise  # nothing to log in with: a plain HTTP error
            raise SessionExpired(str(exc)) from None

    def _checked(self, page: Page, wait: Locator | None, requested: str | None = None) -> Page:
        login = self.spec.login
        if login is not None:
            at_login = self.url(login.url)
            # Sent to the login page (a redirect) when asking for another one: a challenge.
            if requested is not None and not same_page(requested, at_login) and same_page(page.url, at_login):
                raise SessionExpired(f"source {self.spec.name!r}: {requested} was sent to the login page {page.url}")
        if wait is not None:
            unless = f"{login.form_css} input[type=password]" if login is not None else None
            page = self.fetcher.wait_for(wait, self.spec.listing.wait, unless) or page
        if login is not None and self._is_login_page(page):
            raise SessionExpired(f"source {self.spec.name!r}: {page.url} shows the login form")
        return page

    def _is_login_page(self, page: Page) -> bool:
        login = self.spec.login
        assert login is not None
        # Any one configured input (or a password box) is enough: a renamed input must not make the
        # login page pass for a list page, or the run would end in a confusing layout-drift error.
        for form in css(page.tree, login.form_css):
            names = set(strings(form, ".//input/@name"))
            if names & set(login.fields) or elements(form, ".//input[@type='password']"):
                return True
        return False

    # -- list pages ------------------------------------------------------------------------

    def _crawl(self, limit: int | None) -> Crawl:
        self._unmatched = {}
        self.first_page = None
        items: list[dict[str, Any]] = []
        wait = self.spec.listing.rows
        page = self.first_page = self._open(self.url(self.spec.listing.url), wait)
        seen_pages: set[str] = set()
        visited_links: set[str] = set()
        pages = 0
        complete = False
        while True:
            rows = [r for r in self.rows(page.tree) if isinstance(r, etree._Element)]
            if pages == 0 and len(rows) < self.spec.listing.min_rows:
                raise self._drift(page, "list rows", str(self.spec.listing.rows))
            fingerprint = _fingerprint(rows)
            repeated = bool(rows) and fingerprint in seen_pages
            if repeated and self.next is not None:
                log().info("pagination came back to a page already read; stopping", source=self.spec.name,
                           url=page.url)
                complete = True
                break
            if not repeated:
                seen_pages.add(fingerprint)
                pages += 1
            wanted = None if limit is None else limit - len(items)
            at_limit = wanted is not None and not repeated and len(rows) >= wanted
            target = self._next_link(page, visited_links) if rows and not at_limit else None
            read = None if repeated else partial(self._read, page, rows, items, wanted)
            if target is None or pages >= self.max_pages:
                if read is not None:
                    read()
                if at_limit:
                    break
                if target is None:
                    complete = True
                    break
                log().warning("max_pages reached; the listing was not read to its end", source=self.spec.name,
                              max_pages=self.max_pages)
                break
            # This page's rows are read while the server builds the next one (static mode).
            page = self._checked(self._challenge(partial(self.fetcher.follow, page, *target, meanwhile=read)), wait)
        if self.detail_link is not None:
            self._add_details(items)
        return Crawl(items, complete, pages, dict(self._unmatched))

    def _read(self, page: Page, rows: list[Node], items: list[dict[str, Any]], wanted: int | None) -> None:
        # Lazily: a preview stops extracting (and counting unmatched selectors) at its limit.
        items.extend(islice(self._items(page, rows), wanted))

    def _items(self, page: Page, rows: list[Node]) -> Iterator[dict[str, Any]]:
        tables = Tables()
        for node in rows:
            row = Row(node, tables)
            item: dict[str, Any] = {}
            for rule in self.list_rules:
                item[rule.name] = self._value(page, rule, row)
            if self.detail_link is not None:
                item[_DETAIL] = urljoin(page.url, self._value(page, self.detail_link, row))
            yield item

    def _value(self, page: Page, rule: Rule, row: Row) -> Any:
        try:
            value = rule.value(row, page.fetched)
        except Unusable as problem:
            # A required value that is empty, unmatched by its regex or unparsable is drift like a
            # missing node: publishing null (or the raw text) would overwrite good data downstream.
            raise self._drift(page, f"field {rule.name!r}", rule.selector, str(problem)) from None
        if value is MISSING:
            if rule.required:
                raise self._drift(page, f"field {rule.name!r}", rule.selector, hint=_hint(rule, row))
            with self._lock:
                self._unmatched[rule.name] = self._unmatched.get(rule.name, 0) + 1
            return None
        return value

    def _next_link(self, page: Page, visited: set[str]) -> tuple[Locator, Node, int] | None:
        if self.next is not None and self._next_query is not None:
            for index, node in enumerate(self._next_query(page.tree)):
                if _active(node):
                    return self.next, node, index
            return None
        if self.pages is not None and self._pages_query is not None:
            for index, node in enumerate(self._pages_query(page.tree)):
                key = node.get("href") or node.get("onclick") or text_of(node)
                if _active(node) and key not in visited:
                    visited.add(key)
                    return self.pages, node, index
        return None

    # -- detail pages ----------------------------------------------------------------------

    def _add_details(self, items: list[dict[str, Any]]) -> None:
        urls = [item.pop(_DETAIL) for item in items]
        # Browser mode renders several detail pages at once in tabs of one thread (Playwright's
        # sync API is bound to its thread); static mode fetches them on threads.
        open_many = getattr(self.fetcher, "open_many", None)
        if open_many is not None and self.fetcher.parallel > 1 and len(urls) > 1:
            pages = open_many(urls, self._open)
            details = [self._read_detail(self._tab_page(page, url)) for page, url in zip(pages, urls, strict=True)]
        elif self.fetcher.parallel > 1 and len(urls) > 1:
            with ThreadPoolExecutor(max_workers=self.fetcher.parallel, thread_name_prefix="straw-detail") as pool:
                details = list(pool.map(self._detail, urls))
        else:
            details = [self._detail(url) for url in urls]
        for item, detail in zip(items, details, strict=True):
            item.update(detail)

    def _tab_page(self, page: Page, url: str) -> Page:
        """A detail page a browser tab loaded; sent to the login page or shown its form: log in, ask again."""
        try:
            return self._checked(page, None, url)
        except SessionExpired:
            return self._open(url)

    def _detail(self, url: str) -> dict[str, Any]:
        return self._read_detail(self._open(url))

    def _read_detail(self, page: Page) -> dict[str, Any]:
        row = Row(page.tree, Tables())
        return {rule.name: self._value(page, rule, row) for rule in self.detail_rules}

    # -- layout drift ----------------------------------------------------------------------

    def _drift(
        self, page: Page, what: str, selector: str, problem: str = "matched nothing", hint: str = ""
    ) -> LayoutDrift:
        return LayoutDrift(self.spec.name, page.url, what, selector, page.html, problem, hint)

    def _save_debug(self, drift: LayoutDrift) -> None:
        # A logged-in page holds session tokens and private data: owner-only, like the session file.
        folder = self.spec.debug_dir
        try:
            private_folder(folder)
            stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
            base = folder / f"{self.spec.name}-{stamp}"
            html = base.with_suffix(".html")
            # A BOM: the saved text is UTF-8 whatever the page's <meta charset> still claims.
            write_private(html, ("\ufeff" + drift.html).encode("utf-8"))
            saved = [str(html)]
            if self.fetcher.screenshot(base.with_suffix(".png")):
                saved.append(str(base.with_suffix(".png")))
        except OSError as exc:
            log().warning("could not save the page for debugging", source=self.spec.name, error=str(exc))
            return
        drift.saved_to(saved)


def _active(node: Any) -> bool:
    """A pager link that can be followed: not disabled, and with somewhere to go."""
    if not isinstance(node, etree._Element) or node.get("disabled") is not None:
        return False
    if node.tag == "a":
        href = node.get("href")
        return bool(href and (not href.startswith("javascript:") or postback_args(href))) or bool(node.get("onclick"))
    return True


def _fingerprint(rows: list[Node]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for row in rows:
        digest.update(etree.tostring(row))
    return digest.hexdigest()


def _hint(rule: Rule, row: Row) -> str:
    """The drift message's hint: elements of the row whose classes resemble the selector's (cheap: one
    walk of one row, only when the run fails anyway). Never in the way of the drift itself."""
    try:
        return describe(nearest(rule, row.node))
    except Exception:
        return ""
