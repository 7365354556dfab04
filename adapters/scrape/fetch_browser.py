"""Browser mode: Playwright drives the system Chromium for pages built by JavaScript.

One browser lives as long as the source; each run gets a fresh context (closed
at the end, so memory stays flat over long runs) with one page reused for every
URL, which is several times faster than a page per URL. A renderer reused for
hundreds of pages keeps growing, so every `RECYCLE_EVERY` page loads the fetcher
moves to a fresh context, cookies kept: before opening a URL, or, on a listing
paged by postbacks (which has no URL for "page 17", only the form on the page
shown), before the next click, after putting the current document back in the
fresh page from its saved response.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import structlog

from adapters.scrape import hosts, session
from adapters.scrape.errors import Challenged, ScrapeError
from adapters.scrape.extract import playwright_selector
from adapters.scrape.fetch import Meanwhile, RateLimit, describe_error, postback_args, with_retries
from adapters.scrape.login import check_submission, login_form
from adapters.scrape.page import Node, Page, rendered
from straw.config_scrape import HttpSpec, Locator, LoginSpec


def log() -> Any:
    # Not cached at import: logs.setup() may be re-run (the CLI, tests) and point at another stream.
    return structlog.get_logger("straw.scrape")


_PRESENT = """([css, xpath, unless]) => {
  const found = css !== null ? document.querySelector(css)
    : document.evaluate(xpath, document, null, XPathResult.FIRST_ORDERED_NODE_TYPE, null).singleNodeValue;
  return found !== null || (unless !== null && document.querySelector(unless) !== null);
}"""
# The same check, and the page itself when it passes: one round trip to the browser instead of two.
_PRESENT_HTML = f"""(arg) => ({_PRESENT})(arg) ? document.documentElement.outerHTML : null"""
RECYCLE_EVERY = 50  # page loads per browser context before a fresh one (cookies carried over)
LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-dev-shm-usage",
    # No page is ever revisited, so no back/forward cache; and keep the frame host across same-site
    # navigations instead of building a new one per document (RenderDocument): a quarter of the
    # time of each page load on the fixture UI.
    "--disable-features=BackForwardCache,RenderDocument",
    # Detail pages render in several tabs at once (`open_many`); all but one are background tabs,
    # whose renderers Chromium would otherwise deprioritize and whose timers it would throttle.
    "--disable-renderer-backgrounding",
    "--disable-background-timer-throttling",
    "--disable-backgrounding-occluded-windows",
]


class BrowserFetcher:
    mode = "browser"

    def __init__(
        self, source: str, http: HttpSpec, session_file: Path | None, executable: Path, base_url: str | None = None
    ) -> None:
        self.source = source
        self.http = http
        self.session_file = session_file
        self.executable = executable
        # Sources on one server share its rate limit (see hosts.py).
        self.host = hosts.register(base_url, http.verify, None, http.rate_limit) if base_url else None
        self._limit = RateLimit(http.rate_limit)
        self._playwright: Any = None
        self._browser: Any = None
        self._context: Any = None
        self._page: Any = None
        self._options: dict[str, Any] = {}
        self._navigations = 0
        self._document: Any = None  # the response that loaded the page's current document
        self._tabs: list[Any] = []  # the extra pages `open_many` renders detail pages in
        self.recycles = 0  # fresh contexts taken mid-run, over the fetcher's life

    @property
    def limit(self) -> RateLimit:
        return self.host.rate() if self.host is not None else self._limit

    @property
    def parallel(self) -> int:
        # Detail pages rendered at once, each in its own tab of the run's context (`open_many`):
        # parsing, styling and running a heavy page's scripts happen in the renderer processes,
        # which work side by side while this thread waits on all of them.
        return self.http.concurrency

    def _launch(self) -> Any:
        if self._browser is None:
            try:
                from playwright.sync_api import sync_playwright
            except ImportError:
                raise ScrapeError(
                    f"source {self.source!r}: browser mode needs Playwright: pip install 'straw[browser]'"
                ) from None
            if not self.executable.exists():
                raise ScrapeError(
                    f"source {self.source!r}: no browser at {self.executable}; install Chromium "
                    "(Debian: apt-get install chromium) or set `browser_executable`"
                )
            self._playwright = driver_acquire(sync_playwright)
            try:
                self._browser = self._playwright.chromium.launch(
                    executable_path=str(self.executable), args=LAUNCH_ARGS, headless=True
                )
            except Exception as exc:
                driver_release()
                self._playwright = None
                raise ScrapeError(f"source {self.source!r}: cannot start {self.executable}: {exc}") from None
        return self._browser

    def begin(self) -> None:
        browser = self._launch()
        options: dict[str, Any] = {
            "ignore_https_errors": self.http.verify is False,
            "extra_http_headers": dict(self.http.headers) or None,
        }
        if self.http.basic_auth is not None:
            options["http_credentials"] = {
                "username": self.http.basic_auth.username,
                "password": self.http.basic_auth.password,
            }
        options["storage_state"] = session.load(self.session_file, self.source)
        self._options = {k: v for k, v in options.items() if v is not None}
        self._context = browser.new_context(**self._options)
        self._context.set_default_timeout(self.http.timeout * 1000)
        self._page = self._context.new_page()
        self._navigations = 0
        self._document = None

    def _recycle(self) -> None:
        """A fresh context and page, same cookies: a renderer reused for hundreds of pages keeps growing."""
        state = self._context.storage_state()
        self._tabs = []
        self._context.close()
        self._context = self._launch().new_context(**{**self._options, "storage_state": state})
        self._context.set_default_timeout(self.http.timeout * 1000)
        self._page = self._context.new_page()
        self._navigations = 0
        self._document = None
        self.recycles += 1

    def _recycle_here(self) -> None:
        """A fresh context showing the document the old one shows: its response replayed, not re-fetched.

        For a listing paged by postbacks the place in the listing lives in the page itself (the
        WebForms view state); going to its URL again would start over at page 1. The saved response
        is served to the fresh page at the same URL, so its scripts, form and cookies behave as
        before and the next click posts from where the old page was.
        """
        from playwright.sync_api import Error as PlaywrightError

        if self._document is None:
            return  # not loaded by a navigation we saw (the login form): recycle at the next one
        try:
            body = self._document.body()
        except PlaywrightError:
            return  # the browser no longer holds it: try after the next page load
        url = self.page.url
        headers = {k: v for k, v in self._document.headers.items() if k == "content-type"}
        wanted = url.split("#", 1)[0]
        served: list[str] = []

        def replay(route: Any) -> None:
            served.append(route.request.url)
            route.fulfill(status=200, headers=headers, body=body)

        self._recycle()
        self._page.route(lambda u: u.split("#", 1)[0] == wanted, replay, times=1)
        try:
            self._document = self._page.goto(url, wait_until="load")
        except PlaywrightError as exc:
            raise ScrapeError(f"source {self.source!r}: could not restore {url} in a fresh browser context: "
                              f"{describe_error(exc)}") from None
        if not served:
            # The page was loaded from the server instead: it shows another place in the listing.
            raise ScrapeError(f"source {self.source!r}: could not restore {url} in a fresh browser context")

    def _new_page(self) -> None:
        from playwright.sync_api import Error as PlaywrightError

        with contextlib.suppress(PlaywrightError):  # a page that is stuck or already gone
            self._page.close()
        self._page = self._context.new_page()
        self._document = None

    def end(self) -> None:
        self._tabs = []
        if self._context is not None:
            self._context.close()
        self._context = self._page = self._document = None

    def save_session(self) -> None:
        if self._context is not None:
            session.save(self.session_file, self._context.storage_state())

    @property
    def page(self) -> Any:
        if self._page is None:
            self.begin()
        return self._page

    def _snapshot(self) -> Page:
        # Lazy: crawl reads it after waiting for the rows; it must be read before the next navigation.
        # Serialized by the page's own world: `page.content()` first injects Playwright's utility script
        # into every new document, ten times the cost of the read itself.
        page = self.page
        url = page.url
        return Page(url, lambda: rendered(url, str(page.evaluate("() => document.documentElement.outerHTML"))))

    def _retrying(self, what: str, action: Any) -> Page:
        from playwright.sync_api import Error as PlaywrightError

        def attempt() -> Page | str:
            try:
                response = action()
            except PlaywrightError as exc:
                # A navigation that timed out is still pending in the page, and the next one to the
                # same URL would be aborted by it: the retry starts from a new page (same context).
                self._new_page()
                return describe_error(exc)
            status = response.status if response is not None else 200
            if status >= 500:
                return f"HTTP {status}"
            if status in (401, 403):
                raise Challenged(f"source {self.source!r}: {what}: HTTP {status}", status)
            if status >= 400:
                raise ScrapeError(f"source {self.source!r}: {what}: HTTP {status}")
            self._document = response
            return self._snapshot()

        return with_retries(self.source, what, self.http, self.limit, attempt)

    def open(self, url: str) -> Page:
        if self._navigations >= RECYCLE_EVERY:
            self._recycle()
        self._navigations += 1
        return self._retrying(f"GET {url}", lambda: self.page.goto(url, wait_until="load"))

    def open_many(self, urls: list[str], fallback: Callable[[str], Page] | None = None) -> Iterator[Page]:
        """The pages at `urls`, in order, with up to `parallel` of them loading and rendering at once.

        Each tab starts its next URL as soon as its page has been handed over and read (the Page
        is read eagerly before the tab moves on). A URL whose load fails, or answers 4xx/5xx, is
        fetched again by `open`, with its retries and errors, when its turn comes. Every `RECYCLE_EVERY` loads
        per tab the tabs are drained and the run moves to a fresh context, as `open` does.
        `fallback` (default `open`): how such a URL is fetched again; the crawler passes its own, which
        logs in when the page answers 401/403.
        """
        from playwright.sync_api import Error as PlaywrightError

        width = max(1, min(self.parallel, len(urls)))
        pending = deque(urls)
        flight: deque[tuple[int, str, Any]] = deque()  # (tab, url, response or the failure)
        loads = 0
        # Each tab's renderer grows with the pages it shows: a tab is replaced by a fresh one (same
        # context, same cookies) after its share of `RECYCLE_EVERY`, so the tabs together hold no
        # more than one page did; the context itself is renewed every `RECYCLE_EVERY * width` loads.
        per_tab = max(1, RECYCLE_EVERY // width)
        tab_loads = [0] * width

        def start(tab: int) -> None:
            nonlocal loads
            url = pending.popleft()
            if tab_loads[tab] >= per_tab:
                self._tabs[tab] = self._fresh_tab(tab)
                tab_loads[tab] = 0
            loads += 1
            tab_loads[tab] += 1
            self.limit.wait()
            try:
                # Only until the server's answer is in: the tab parses and renders on its own meanwhile.
                outcome: Any = self._tabs[tab].goto(url, wait_until="commit")
            except PlaywrightError as exc:
                outcome = exc
            flight.append((tab, url, outcome))

        def fill() -> None:
            busy = {tab for tab, _, _ in flight}
            for tab in range(width):
                if pending and tab not in busy and loads < RECYCLE_EVERY * width:
                    start(tab)

        self.page  # noqa: B018 - a context to open the tabs in
        while pending or flight:
            if not flight:
                if loads >= RECYCLE_EVERY * width:
                    self._recycle()
                    loads = 0
                    tab_loads = [0] * width
                while len(self._tabs) < width:
                    self._tabs.append(self._context.new_page())
                fill()
                continue
            tab, url, outcome = flight.popleft()
            page = self._settled(tab, outcome)
            if page is None:  # failed, or not a plain 2xx/3xx: `open` on the run's own page decides
                page = (fallback or self.open)(url)
            page.html  # noqa: B018 - read before this tab moves on to its next URL
            fill()
            yield page

    def _settled(self, tab: int, outcome: Any) -> Page | None:
        """The tab's page once loaded; None when its load failed or answered 4xx/5xx: the caller then
        fetches it with `open`, whose retries, errors (and login challenges) are the same as for any page."""
        from playwright.sync_api import Error as PlaywrightError

        if isinstance(outcome, PlaywrightError):
            self._tabs[tab] = self._fresh_tab(tab)
            return None
        if outcome is not None and outcome.status >= 400:
            return None
        page = self._tabs[tab]
        try:
            page.wait_for_load_state("load")
            html = str(page.evaluate("() => document.documentElement.outerHTML"))
        except PlaywrightError:
            self._tabs[tab] = self._fresh_tab(tab)
            return None
        return Page(page.url, rendered(page.url, html))

    def _fresh_tab(self, tab: int) -> Any:
        from playwright.sync_api import Error as PlaywrightError

        with contextlib.suppress(PlaywrightError):  # a tab that is stuck or already gone
            self._tabs[tab].close()
        return self._context.new_page()

    def follow(
        self, page: Page, locator: Locator, element: Node, index: int, meanwhile: Meanwhile | None = None
    ) -> Page:
        # First: the browser's DOM is about to be replaced, and Playwright's sync calls block anyway.
        if meanwhile is not None:
            meanwhile()
        href = element.get("href") or ""
        if element.tag == "a" and href and not href.startswith(("#", "javascript:")) and not element.get("onclick"):
            # A plain link: going there is what a click does, without waiting on the click's events.
            return self.open(urljoin(page.url, href))
        navigates = bool(
            postback_args(href) is not None
            or (element.tag in ("input", "button") and next(element.iterancestors("form"), None) is not None)
        )
        return self._click(page, locator, index, navigates)

    def _click(self, page: Page, locator: Locator, index: int, navigates: bool) -> Page:
        if navigates and self._navigations >= RECYCLE_EVERY:
            self._recycle_here()
        target = self.page.locator(playwright_selector(locator)).nth(index)
        if not navigates:
            # A script-driven pager re-renders in place: click, then let its requests settle. Its
            # document, and the place in the listing with it, lasts the whole listing: nothing to
            # recycle it into, so its memory is the web app's own until the run ends.
            target.click()
            self.page.wait_for_load_state("networkidle")
            return self._snapshot()

        def click() -> Any:
            with self.page.expect_navigation(wait_until="load") as navigation:
                target.click()
            return navigation.value

        # Not retried: clicking again after a failed postback could act twice on the server.
        self.limit.wait()
        from playwright.sync_api import Error as PlaywrightError

        self._navigations += 1
        try:
            response = click()
        except PlaywrightError as exc:
            raise ScrapeError(
                f"source {self.source!r}: clicking {locator} on {page.url}: {describe_error(exc)}"
            ) from None
        if response is not None and response.status in (401, 403):
            raise Challenged(f"source {self.source!r}: clicking {locator} on {page.url}: HTTP {response.status}",
                             response.status)
        if response is not None and response.status >= 400:
            raise ScrapeError(f"source {self.source!r}: clicking {locator} on {page.url}: HTTP {response.status}")
        self._document = response
        return self._snapshot()

    def login(self, spec: LoginSpec, url: str) -> Page:
        shown = self.open(url)
        page = self.page
        form = page.locator(f"css={spec.form_css}").nth(login_form(self.source, shown, spec))
        # Where the browser would really send it: the form's resolved method and action.
        method, action = form.evaluate(
            "f => [f.getAttribute('method') || 'get', new URL(f.getAttribute('action') || '', document.baseURI).href]"
        )
        check_submission(self.source, page.url, str(method), str(action))
        for name, value in spec.fields.items():
            form.locator(f"[name={_quoted(name)}]").fill(value)
        submit = form.locator(f"css={spec.submit}") if spec.submit else form.locator(
            "css=[type=submit], button:not([type])"
        )
        with page.expect_navigation(wait_until="load") as navigation:
            submit.first.click()
        self._document = navigation.value
        return self._snapshot()

    def wait_for(self, locator: Locator, seconds: float, unless: str | None = None) -> Page | None:
        from playwright.sync_api import Error as PlaywrightError

        # The login form instead of the list (`unless`) ends the wait too: the crawl then logs in.
        # Checked in the page's own world: a Playwright locator first injects its engine into every
        # new document, which costs more than reading the page.
        arg = [locator.css, locator.xpath, unless]
        try:
            html = self.page.evaluate(_PRESENT_HTML, arg)
            if html is not None:
                return Page(self.page.url, rendered(self.page.url, str(html)))
            # Checked at each animation frame: a list that arrives by XHR is read as soon as it is there.
            self.page.wait_for_function(_PRESENT, arg=arg, polling="raf", timeout=seconds * 1000)
        except PlaywrightError:
            # Timed out, or a selector only lxml's cssselect understands: drift is reported from the page.
            wanted = self.page.locator(playwright_selector(locator))
            if unless is not None:
                wanted = wanted.or_(self.page.locator(f"css={unless}"))
            with contextlib.suppress(PlaywrightError):
                wanted.first.wait_for(state="attached", timeout=100)
        return self._snapshot()

    def screenshot(self, path: Path) -> bool:
        if self._page is None:
            return False
        try:
            self._page.screenshot(path=str(path), full_page=True)
        except Exception:  # a debugging aid: never hide the real error behind a screenshot failure
            return False
        os.chmod(path, 0o600)
        return True

    def close(self) -> None:
        self.end()
        if self._browser is not None:
            self._browser.close()
            self._browser = None
        if self._playwright is not None:
            driver_release()
            self._playwright = None
        if self.host is not None:
            hosts.release(self.host)
            self.host = None


# Playwright's sync API can be started once per thread: browser sources polled by the same thread
# (the runner polls every source from one) share one driver, each with its own browser.
_drivers = threading.local()


def driver_acquire(start: Callable[[], Any]) -> Any:
    if getattr(_drivers, "users", 0) == 0:
        _drivers.playwright = start().start()
        _drivers.users = 0
    _drivers.users += 1
    return _drivers.playwright


def driver_release() -> None:
    _drivers.users -= 1
    if _drivers.users == 0:
        _drivers.playwright.stop()
        _drivers.playwright = None


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
