"""Layout drift: the UI changed under the configuration. The run fails loudly, saves the page, commits nothing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from fixtures.webui import WebUI, start_webui
from fixtures.webui.configs import app_list, grid_list, orders_list, scrape_config
from tests.helpers import run_once, source_state


@pytest.fixture
def webui() -> Iterator[WebUI]:
    ui = start_webui(35)
    yield ui
    ui.stop()


def test_a_required_field_matching_nothing_fails_the_run_and_saves_the_page(
    tmp_path: Path, webui: WebUI, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    path = scrape_config(tmp_path, webui, redis_url=redis_url, stream=stream_name, listing=orders_list(),
                         with_detail=False)
    assert run_once(path).errors == []
    position_before, _ = source_state(tmp_path)
    webui.layout = "v2"  # the amount cells lost their class
    webui.orders[1001].customer = "Renamed BV"
    result = run_once(path)
    assert len(result.errors) == 1
    error = result.errors[0]
    assert "source 'web-orders'" in error
    assert f"{webui.url}orders" in error
    assert "field 'amount' (css 'td.amt') matched nothing" in error
    saved = sorted((tmp_path / "debug").glob("web-orders-*.html"))
    assert len(saved) == 1 and str(saved[0]) in error
    page = saved[0].read_text(encoding="utf-8-sig")
    assert 'class="bedrag"' in page and "„Grüße“ GmbH" in page
    assert redis_client.xlen(stream_name) == 35  # the renamed customer was not delivered
    position_after, recorded = source_state(tmp_path)
    assert position_after == position_before
    assert recorded is not None and "td.amt" in recorded


def test_drift_on_a_late_detail_page_commits_nothing_of_the_run(
    tmp_path: Path, webui: WebUI, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    webui.broken_detail = 1033
    path = scrape_config(tmp_path, webui, redis_url=redis_url, stream=stream_name, listing=orders_list(),
                         batch_size=5)
    result = run_once(path)
    assert "field 'status' (css '#status') matched nothing" in result.errors[0]
    assert f"{webui.url}order/1033" in result.errors[0]
    assert redis_client.xlen(stream_name) == 0
    assert source_state(tmp_path)[0] is None


@pytest.mark.parametrize(
    ("listing", "layout", "selector"),
    [
        (grid_list(), "v2", "xpath \"//table[@id='ctl00_Main_gvOrders']"),
        (app_list(), "v1", "css '#appgrid tr.order'"),  # built by JavaScript: static mode sees no rows
    ],
    ids=["grid-renamed", "javascript-page-in-static-mode"],
)
def test_a_list_without_rows_is_drift(
    tmp_path: Path, webui: WebUI, redis_url: str, redis_client: redis.Redis, stream_name: str,
    listing: dict[str, object], layout: str, selector: str,
) -> None:
    webui.layout = layout
    path = scrape_config(tmp_path, webui, redis_url=redis_url, stream=stream_name, listing=listing,
                         with_detail=False)
    result = run_once(path)
    assert "list rows (" + selector in result.errors[0]
    assert "matched nothing" in result.errors[0]
    assert redis_client.xlen(stream_name) == 0


def test_an_empty_list_is_fine_when_allowed(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    ui = start_webui(0)
    try:
        listing = {**orders_list(), "min_rows": 0}
        path = scrape_config(tmp_path, ui, redis_url=redis_url, stream=stream_name, listing=listing,
                             with_detail=False)
        assert run_once(path).errors == []
        assert redis_client.xlen(stream_name) == 0
        assert source_state(tmp_path)[0] is not None  # the (empty) complete listing was recorded
    finally:
        ui.stop()
