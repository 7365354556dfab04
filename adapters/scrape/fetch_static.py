"""Static mode: httpx fetches, lxml reads; forms and WebForms postbacks are posted like a browser would."""

from __future__ import annotations

import ssl
import time
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import httpx
import structlog

from adapters.scrape import hosts, session
from adapters.scrape.errors import Challenged, ScrapeError
from adapters.scrape.fetch import (
    Meanwhile,
    Once,
    RateLimit,
    backoff,
    describe_error,
    enclosing_form,
    form_values,
    postback_args,
    with_retries,
)
from adapters.scrape.hosts import TlsWhenNeeded
from adapters.scrape.login import check_submission, login_form
from adapters.scrape.page import Node, Page, css, decode
from straw.config_scrape import HttpSpec, Locator, LoginSpec


def log() -> Any:
    # Not cached at import: logs.setup() may be re-run (the CLI, tests) and point at another stream.
    return structlog.get_logger("straw.scrape")


class StaticFetcher:
    mode = "static"

    def __init__(self, source: str, http: HttpSpec, session_file: Path | None, base_url: str | None = None) -> None:
        self.source = source
        self.http = http
        self.session_file = session_file
        self._client: httpx.Client | None = None
        # Sources on one server share its connection pool and rate limit (see hosts.py).
        self.host = hosts.register(base_url, http.verify, http.concurrency, http.rate_limit) if base_url else None
        self._limit = RateLimit(http.rate_limit)

    @property
    def limit(self) -> RateLimit:
        return self.host.rate() if self.host is not None else self._limit

    @property
    def client(self) -> httpx.Client:
        # Made at first use (in a poll), so a bad CA file is a poll error in `straw status`, not a crash.
        if self._client is None:
            http = self.http
            verify: bool | ssl.SSLContext = http.verify if not isinstance(http.verify, Path) else True
            if isinstance(http.verify, Path):
                try:
                    verify = ssl.create_default_context(cafile=str(http.verify))
                except (OSError, ssl.SSLError) as exc:
                    raise ScrapeError(
                        f"source {self.source!r}: cannot use CA bundle {http.verify}: {exc}; fix `http.verify`"
                    ) from None
            limits = httpx.Limits(max_connections=http.concurrency, max_keepalive_connections=http.concurrency)
            if self.host is not None:
                limits = httpx.Limits(max_connections=self.host.connections,
                                      max_keepalive_connections=self.host.connections)
            transport = self.host.transport(verify) if self.host is not None else TlsWhenNeeded(verify, limits)
            self._client = httpx.Client(
                follow_redirects=True,
                timeout=http.timeout,
                auth=httpx.BasicAuth(http.basic_auth.username, http.basic_auth.password) if http.basic_auth else None,
                headers={"User-Agent": "straw-scrape/0.1", **http.headers},
                transport=transport,
                # Still given for the transports of proxies named in the environment.
                verify=verify,
                limits=limits,
            )
        return self._client

    @property
    def parallel(self) -> int:
        return self.http.concurrency

    def begin(self) -> None:
        state = session.load(self.session_file, self.source)
        for cookie in state["cookies"] if state else []:
            self.client.cookies.set(cookie["name"], cookie["value"], domain=cookie["domain"], path=cookie["path"])

    def save_session(self) -> None:
        session.save(self.session_file, session.from_jar(self.client.cookies.jar))

    def end(self) -> None:
        pass

    def _request(
        self, method: str, url: str, data: dict[str, str] | None = None, meanwhile: Meanwhile | None = None
    ) -> Page:
        once = Once(meanwhile)

        def on_trace(event: str, info: dict[str, Any]) -> None:
            # httpcore's trace hook: the request has been sent and the server is at work. The
            # caller's own work goes here, so the answer is waiting in the socket when we read it
            # (no idle wait, no wake-up). Should the event be renamed, `once()` below still runs it.
            if event == "http11.receive_response_headers.started":
                once()

        extensions = {"trace": on_trace} if meanwhile is not None else None

        def attempt() -> Page | str:
            try:
                response = self.client.request(method, url, data=data, extensions=extensions)
            except httpx.HTTPError as exc:
                return describe_error(exc)
            if response.status_code >= 500:
                return f"HTTP {response.status_code}"
            if response.status_code in (401, 403):
                raise Challenged(f"source {self.source!r}: {method} {url}: HTTP {response.status_code}",
                                 response.status_code)
            if response.status_code >= 400:
                raise ScrapeError(f"source {self.source!r}: {method} {url}: HTTP {response.status_code}")
            text = decode(response.content, response.headers.get("content-type"), self.http.encoding, str(response.url))
            return Page(str(response.url), text)

        try:
            page = with_retries(self.source, f"{method} {url}", self.http, self.limit, attempt)
        except Exception:
            # Not run yet if no request got out. Run now: an error of the caller's work (layout
            # drift on the page before) is the one to report, as it would have come first.
            once()
            raise
        once()
        return page

    def open(self, url: str) -> Page:
        return self._request("GET", url)

    def _form_request(
        self, page: Page, form: Node, values: dict[str, str]
    ) -> tuple[str, str, dict[str, str] | None]:
        action = urljoin(page.url, form.get("action") or page.url)
        if (form.get("method") or "get").lower() == "post":
            return "POST", action, values
        return "GET", str(httpx.URL(action).copy_merge_params(values)), None

    def submit(self, page: Page, form: Node, values: dict[str, str]) -> Page:
        return self._request(*self._form_request(page, form, values))

    def follow(
        self, page: Page, locator: Locator, element: Node, index: int, meanwhile: Meanwhile | None = None
    ) -> Page:
        try:
            method, url, data = self._activate(page, locator, element)
        except Exception:
            Once(meanwhile)()
            raise
        return self._request(method, url, data, meanwhile)

    def _activate(self, page: Page, locator: Locator, element: Node) -> tuple[str, str, dict[str, str] | None]:
        """The request a browser makes when `element` is clicked: a link, a postback link or a button."""
        href = element.get("href")
        postback = postback_args(href) or postback_args(element.get("onclick"))
        if postback is not None or (element.tag in ("input", "button") and element.get("href") is None):
            form = enclosing_form(element)
            if form is None:
                raise ScrapeError(f"source {self.source!r}: {locator} on {page.url} posts back, but there is no form")
            values = form_values(form)
            if postback is not None:
                values["__EVENTTARGET"], values["__EVENTARGUMENT"] = postback
            elif element.get("name"):
                values[str(element.get("name"))] = element.get("value") or ""
            return self._form_request(page, form, values)
        if not href:
            raise ScrapeError(f"source {self.source!r}: {locator} on {page.url} has no href to follow")
        return "GET", urljoin(page.url, href), None

    def login(self, spec: LoginSpec, url: str) -> Page:
        # A failed POST is not sent again: its single-use token is spent. The form is fetched afresh.
        attempts = self.http.retries + 1
        problem = ""
        for number in range(attempts):
            page = self.open(url)
            form = css(page.tree, spec.form_css)[login_form(self.source, page, spec)]
            values = form_values(form)
            values.update(spec.fields)
            method, action, _ = self._form_request(page, form, {})
            check_submission(self.source, page.url, method, action)
            outcome = self._post_login(page.url, action, values)
            if isinstance(outcome, Page):
                return outcome
            problem = outcome
            if number + 1 < attempts:
                delay = backoff(number, self.http.backoff)
                log().warning("retrying", source=self.source, what=f"login at {page.url}", error=problem,
                              retry_in=delay)
                time.sleep(delay)
        raise ScrapeError(f"source {self.source!r}: login at {url} failed {attempts} time(s): {problem}")

    def _post_login(self, page_url: str, action: str, values: dict[str, str]) -> Page | str:
        """POST the credentials; redirects are followed by hand, so that none re-posts them elsewhere."""
        self.limit.wait()
        try:
            response = self.client.request("POST", action, data=values, follow_redirects=False)
            while response.next_request is not None:
                following = response.next_request
                if following.method == "POST":
                    # 307/308 repeat the POST, body and all: only within the login page's origin.
                    check_submission(self.source, page_url, "POST", str(following.url))
                response = self.client.send(following, follow_redirects=False)
        except httpx.HTTPError as exc:
            return describe_error(exc)
        if response.status_code >= 500:
            return f"HTTP {response.status_code}"
        # 4xx too: the success check then says the login did not succeed.
        text = decode(response.content, response.headers.get("content-type"), self.http.encoding)
        return Page(str(response.url), text)

    def wait_for(self, locator: Locator, seconds: float, unless: str | None = None) -> Page | None:
        return None

    def screenshot(self, path: Path) -> bool:
        return False

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self.host is not None:
            hosts.release(self.host)
            self.host = None
