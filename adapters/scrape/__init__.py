"""Web UI scraping: a YAML description of pages and selectors becomes canonical rows.

`static` mode fetches with httpx and reads HTML with lxml; `browser` mode drives
the system Chromium through Playwright for pages built by JavaScript. Both share
the navigation and extraction code, so one configuration serves either.
"""

from adapters.scrape.errors import LayoutDrift, LoginFailed, ScrapeError
from adapters.scrape.source import ScrapeSource

__all__ = ["LayoutDrift", "LoginFailed", "ScrapeError", "ScrapeSource"]
