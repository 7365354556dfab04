"""Web UI scraping: a YAML description of pages and selectors becomes canonical rows.

`static` mode fetches with httpx and reads HTML with lxml; `browser` mode drives
the system Chromium through Playwright for pages built by JavaScript. Both share
the navigation and extraction code, so one configuration serves either.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from adapters.scrape.errors import LayoutDrift, LoginFailed, ScrapeError

if TYPE_CHECKING:
    from adapters.scrape.source import ScrapeSource

__all__ = ["LayoutDrift", "LoginFailed", "ScrapeError", "ScrapeSource"]


def __getattr__(name: str) -> Any:
    # Imported when first asked for: the runner and the CLI catch ScrapeError from here, and a process that
    # polls databases only would otherwise load bs4, lxml and httpx at every start (~0.15 s of CPU).
    if name == "ScrapeSource":
        from adapters.scrape.source import ScrapeSource

        return ScrapeSource
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
