"""What can stop a scrape run; the runner reports these and does not advance the position."""

from __future__ import annotations


class ScrapeError(Exception):
    """The web UI could not be read (HTTP failure, browser failure, bad page)."""


class LoginFailed(ScrapeError):
    """The login form was submitted but the success check did not pass."""


class Challenged(ScrapeError):
    """The server answered 401 or 403: a login challenge when a login is configured, else a plain error."""

    def __init__(self, text: str, status: int) -> None:
        super().__init__(text)
        self.status = status


class SessionExpired(ScrapeError):
    """A page came back as the login form mid-run; the crawl logs in again once."""


class LayoutDrift(ScrapeError):
    """The page no longer looks like the configuration expects."""

    def __init__(
        self, source: str, url: str, what: str, selector: str, html: str, problem: str = "matched nothing",
        hint: str = "",
    ) -> None:
        self.source, self.url, self.what, self.selector, self.html = source, url, what, selector, html
        self.problem = problem  # "matched nothing", "is empty", the regex or parse failure
        self.hint = hint  # the elements most like what the field should find (adapters/scrape/hints.py)
        self.saved: list[str] = []
        super().__init__(self._text())

    def _text(self) -> str:
        text = f"source {self.source!r}: layout drift on {self.url}: {self.what} ({self.selector}) {self.problem}"
        if self.hint:
            text += f"; nearest: {self.hint}"
        if self.saved:
            text += f"; saved {', '.join(self.saved)}"
        return text + "; update the selector in the configuration (`straw preview` helps)"

    def saved_to(self, paths: list[str]) -> None:
        self.saved = paths
        self.args = (self._text(),)
