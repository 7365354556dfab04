"""The same scrape configurations in browser mode: Playwright driving the system Chromium."""

from __future__ import annotations

import importlib.util
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from adapters.scrape import ScrapeSource, fetch_browser
from fixtures.webui import WebUI, start_webui
from fixtures.webui.configs import app_list, grid_list, orders_list, scrape_config
from straw.config_load import load_config
from straw.config_scrape import ScrapeSourceSpec
from tests.helpers import read_stream, run_once

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("playwright") is None or not CHROMIUM.exists(),
    reason="browser mode needs Playwright (pip install -e '.[test]') and Chromium at /usr/bin/chromium "
    "(Debian: apt-get install chromium; scripts/test.sh installs it when run as root)",
)


@pytest.fixture
def webui() -> Iterator[WebUI]:
    ui = start_webui(35)
    yield ui
    ui.stop()


def subjects(client: redis.Redis, stream: str) -> list[str]:
    return [entry["event"]["subject"] for entry in read_stream(client, stream)]


def test_javascript_grid_is_read_in_browser_mode(
    tmp_path: Path, webui: WebUI, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    path = scrape_config(tmp_path, webui, redis_url=redis_url, stream=stream_name, listing=app_list(),
                         mode="browser", with_detail=False)
    assert run_once(path).errors == []
    entries = read_stream(redis_client, stream_name)
    assert [e["event"]["subject"] for e in entries] == [str(no) for no in range(1001, 1036)]
    assert entries[1]["event"]["data"] == {
        "order_no": 1002, "customer": "„Grüße“ GmbH", "order_date": "2026-01-02", "amount": "79.19", "paid": False,
    }
    webui.orders[1010].customer = "Nieuw BV"
    assert run_once(path).errors == []
    assert subjects(redis_client, stream_name)[35:] == ["1010"]


def test_postback_pagination_by_clicking(
    tmp_path: Path, webui: WebUI, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    path = scrape_config(tmp_path, webui, redis_url=redis_url, stream=stream_name, listing=grid_list("pages"),
                         mode="browser", with_detail=False)
    assert run_once(path).errors == []
    entries = read_stream(redis_client, stream_name)
    assert [e["event"]["subject"] for e in entries] == [str(no) for no in range(1001, 1036)]
    assert entries[4]["event"]["data"]["amount"] == str(webui.orders[1005].amount)  # shown as (…) in the grid


def test_login_details_and_saved_session(
    tmp_path: Path, webui: WebUI, redis_url: str, redis_client: redis.Redis, stream_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fetch_browser, "RECYCLE_EVERY", 4)  # fresh contexts mid-run must keep the session
    webui.orders = {no: o for no, o in webui.orders.items() if no <= 1012}
    path = scrape_config(tmp_path, webui, redis_url=redis_url, stream=stream_name, listing=orders_list(),
                         mode="browser")
    assert run_once(path).errors == []
    entries = read_stream(redis_client, stream_name)
    assert len(entries) == 12
    assert entries[0]["event"]["data"]["status"] == "OPEN" and entries[0]["event"]["data"]["paid"] is True
    assert stat.S_IMODE((tmp_path / "session.json").stat().st_mode) == 0o600
    assert run_once(path).errors == []
    assert webui.logins == 1


def test_expired_session_mid_run_logs_in_again(
    tmp_path: Path, webui: WebUI, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    path = scrape_config(tmp_path, webui, redis_url=redis_url, stream=stream_name, listing=grid_list("next"),
                         mode="browser", with_detail=False)
    assert run_once(path).errors == []
    webui.expire_at = webui.requests + 3  # a postback click of the next run lands on the login form
    webui.orders[1030].customer = "Nieuw BV"
    assert run_once(path).errors == []
    assert webui.logins == 2
    assert subjects(redis_client, stream_name)[35:] == ["1030"]


def test_drift_saves_html_and_screenshot(
    tmp_path: Path, webui: WebUI, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    webui.layout = "v2"
    listing = {**grid_list(), "wait": 0.2}  # how long rows may take to appear: they never will
    path = scrape_config(tmp_path, webui, redis_url=redis_url, stream=stream_name, listing=listing,
                         mode="browser", with_detail=False)
    result = run_once(path)
    assert "list rows (xpath" in result.errors[0]
    screenshot = next((tmp_path / "debug").glob("*.png"))
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(screenshot) in result.errors[0]
    assert redis_client.xlen(stream_name) == 0


def test_browser_failures_fail_the_poll_not_the_runner(
    tmp_path: Path, webui: WebUI, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    path = scrape_config(tmp_path, webui, redis_url=redis_url, stream=stream_name, listing=app_list(),
                         mode="browser", with_detail=False, http={"timeout": 5, "retries": 0})
    # A submit button that is not there: Playwright times out waiting for it (a renamed input is
    # caught before the browser is asked: see tests/test_scrape_login.py). The timeout bounds every page
    # action, the first navigation too: 1 s was passed by that goto once under a loaded CI's four workers.
    path.write_text(path.read_text().replace("  success:", "  submit: button#gone\n    success:", 1))
    result = run_once(path)
    assert len(result.errors) == 1
    assert "source 'web-orders': browser: TimeoutError" in result.errors[0]
    assert redis_client.xlen(stream_name) == 0


def test_basic_auth_and_login_checked_by_url(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    ui = start_webui(12, basic_auth=("svc", "pa:ss"))
    try:
        path = scrape_config(tmp_path, ui, redis_url=redis_url, stream=stream_name, listing=grid_list(),
                             mode="browser", with_detail=False,
                             http={"basic_auth": {"username": "svc", "password": "pa:ss"}})
        # Logged in, the UI lands on its home page.
        path.write_text(path.read_text().replace("selector: '#logout'", "url_contains: /home"))
        assert "url_contains: /home" in path.read_text()
        assert run_once(path).errors == []
        assert redis_client.xlen(stream_name) == 12
        assert ui.logins == 1
    finally:
        ui.stop()


def test_long_postback_listing_recycles_the_context_and_reads_every_row_once(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, stream_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Paged only by clicking the WebForms "Next" postback: no URL leads to page 7, yet the renderer
    # must still be replaced every few pages.
    monkeypatch.setattr(fetch_browser, "RECYCLE_EVERY", 3)
    ui = start_webui(95)  # ten pages
    try:
        path = scrape_config(tmp_path, ui, redis_url=redis_url, stream=stream_name, listing=grid_list("next"),
                             mode="browser", with_detail=False)
        spec = load_config(path).sources[0]
        assert isinstance(spec, ScrapeSourceSpec)
        source = ScrapeSource(spec)
        try:
            crawl = source.crawl()
            fetcher = source.fetcher
            assert isinstance(fetcher, fetch_browser.BrowserFetcher)
            recycles = fetcher.recycles
        finally:
            source.close()
        assert crawl.complete and crawl.pages == 10
        assert [item["order_no"] for item in crawl.items] == list(range(1001, 1096))
        assert recycles >= 2
        # Met the login form once, then each page came from the server once: the recycled pages were
        # restored from their saved responses, not fetched again.
        assert ui.hits["/grid.aspx"] == 1 + 10
        assert run_once(path).errors == []  # and end to end, recycling on the way: each item once
        assert subjects(redis_client, stream_name) == [str(no) for no in range(1001, 1096)]
    finally:
        ui.stop()


def test_two_browser_sources_polled_by_one_thread(
    tmp_path: Path, webui: WebUI, redis_url: str, stream_name: str
) -> None:
    # The runner polls every source from one thread, and Playwright's sync API starts once per thread.
    specs = []
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        path = scrape_config(tmp_path / name, webui, redis_url=redis_url, stream=stream_name, listing=app_list(),
                             mode="browser", with_detail=False)
        spec = load_config(path).sources[0]
        assert isinstance(spec, ScrapeSourceSpec)
        specs.append(spec)
    first, second = ScrapeSource(specs[0]), ScrapeSource(specs[1])
    try:
        assert len(first.crawl().items) == 35
        assert len(second.crawl().items) == 35
        first.close()
        assert len(second.crawl().items) == 35  # the shared driver outlives the source that closed
    finally:
        first.close()
        second.close()
