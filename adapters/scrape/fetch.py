"""What navigation needs from a fetcher, and what static and browser fetchers share."""

from __future__ import annotations

import os
import re
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import structlog

from adapters.scrape.errors import ScrapeError
from adapters.scrape.page import Node, Page, elements
from straw.config_scrape import HttpSpec, Locator, LoginSpec

_POSTBACK = re.compile(r"""__doPostBack\(\s*['"]([^'"]*)['"]\s*,\s*['"]([^'"]*)['"]\s*\)""")


Meanwhile = Callable[[], None]


class Once:
    """Runs `work` the first time it is called, then never again."""

    def __init__(self, work: Meanwhile | None) -> None:
        self._work = work

    def __call__(self) -> None:
        work, self._work = self._work, None
        if work is not None:
            work()


class Fetcher(Protocol):
    mode: str

    def begin(self) -> None:
        """Start a run (browser: a fresh context; static: load the saved session)."""

    def end(self) -> None:
        """End a run; keep the browser, drop the context."""

    def open(self, url: str) -> Page: ...

    def follow(
        self, page: Page, locator: Locator, element: Node, index: int, meanwhile: Meanwhile | None = None
    ) -> Page:
        """The page that activating the `index`th match of `locator` on `page` leads to (a link,
        postback link or button).

        `meanwhile` runs once before this returns or fails: static mode runs it once the request is
        on the wire, so the server builds the next page while the caller reads this one. Its
        exceptions propagate, and win over the fetch's own error.
        """
        ...

    def login(self, spec: LoginSpec, url: str) -> Page: ...

    def wait_for(self, locator: Locator, seconds: float, unless: str | None = None) -> Page | None:
        """Browser: let a script-built list (or the `unless` CSS) appear; return the page as it is now.

        Static: nothing to wait for, None.
        """
        ...

    def save_session(self) -> None:
        """Keep the logged-in session for the next run (owner-only file), if configured."""

    def screenshot(self, path: Path) -> bool: ...

    def close(self) -> None: ...

    @property
    def parallel(self) -> int:
        """How many detail pages may be fetched at once."""
        ...


def postback_args(href: str | None) -> tuple[str, str] | None:
    """ASP.NET WebForms: `javascript:__doPostBack('grid$pager','Page$3')` -> ('grid$pager', 'Page$3')."""
    if not href:
        return None
    found = _POSTBACK.search(href)
    return (found.group(1), found.group(2)) if found else None


def form_values(form: Node) -> dict[str, str]:
    """What a browser would submit from this form, without any button: hidden fields, CSRF tokens included."""
    values: dict[str, str] = {}
    for field in elements(form, ".//input[@name] | .//select[@name] | .//textarea[@name]"):
        name = str(field.get("name"))
        if field.tag == "input":
            kind = (field.get("type") or "text").lower()
            if kind in ("submit", "button", "image", "reset", "file"):
                continue
            if kind in ("checkbox", "radio") and field.get("checked") is None:
                continue
            values[name] = field.get("value") or ("on" if kind in ("checkbox", "radio") else "")
        elif field.tag == "select":
            chosen = elements(field, ".//option[@selected]") or elements(field, ".//option[1]")
            values[name] = (chosen[0].get("value") or "".join(map(str, chosen[0].itertext()))) if chosen else ""
        else:
            values[name] = "".join(map(str, field.itertext()))
    return values


def enclosing_form(element: Node) -> Node | None:
    form = next(element.iterancestors("form"), None)
    if form is None:
        # WebForms pages have one server form; a pager outside it still posts that form.
        found = elements(element.getroottree().getroot(), "//form")
        form = found[0] if found else None
    return form


def private_folder(folder: Path) -> None:
    """A folder only its owner can enter (0700), whatever the umask or its mode before."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if stat.S_IMODE(folder.stat().st_mode) != 0o700:
        os.chmod(folder, 0o700)


def write_private(path: Path, data: bytes) -> None:
    """Write a file readable by its owner only: session cookies, logged-in pages."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(path.name + ".tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(temp, 0o600)
    os.replace(temp, path)


class RateLimit:
    """At most `per_second` request starts per second, across threads."""

    def __init__(self, per_second: float | None) -> None:
        self.interval = 1.0 / per_second if per_second else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            time.sleep(start - now)


def backoff(attempt: int, base: float) -> float:
    return float(min(base * 2**attempt, 30.0))


def with_retries(
    source: str, what: str, http: HttpSpec, limit: RateLimit, attempt: Callable[[], Page | str]
) -> Page:
    """Run `attempt` until it gives a page. A string it returns is a passing problem (timeout,
    connection, 5xx) worth another try after a backoff; a fatal one it raises itself."""
    attempts = http.retries + 1
    problem = ""
    for number in range(attempts):
        limit.wait()
        outcome = attempt()
        if isinstance(outcome, Page):
            return outcome
        problem = outcome
        if number + 1 < attempts:
            delay = backoff(number, http.backoff)
            structlog.get_logger("straw.scrape").warning(
                "retrying", source=source, what=what, error=problem, retry_in=delay
            )
            time.sleep(delay)
    raise ScrapeError(f"source {source!r}: {what} failed {attempts} time(s): {problem}")


def describe_error(exc: Any) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
