"""Retries: a request that hangs past `http.timeout` or gets a 5xx is tried again after a growing
backoff; when the retries run out, the run fails and nothing of it is committed."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis
from structlog.testing import capture_logs

from fixtures.webui import WebUI, start_webui
from fixtures.webui.configs import app_list, orders_list, scrape_config
from tests.helpers import read_stream, run_once, source_state

CHROMIUM = Path("/usr/bin/chromium")
needs_browser = pytest.mark.skipif(
    importlib.util.find_spec("playwright") is None or not CHROMIUM.exists(),
    reason="browser mode needs Playwright (pip install -e '.[test]') and Chromium at /usr/bin/chromium",
)
# Short enough to keep the tests quick; the fixture leaves a stalled request unanswered far longer. Browser mode's
# timeout also bounds each page action (Locator.evaluate), which took over 1 s under a loaded CI's four workers.
TIMEOUT = {"static": 1.0, "browser": 4.0}


@pytest.fixture
def webui() -> Iterator[WebUI]:
    ui = start_webui(25, stall_seconds=30.0)  # three list pages of ten
    yield ui
    ui.stop()


def retries_logged(logs: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, float]]:
    return [(e["what"], e["error"].split(":")[0], e["retry_in"]) for e in logs if e["event"] == "retrying"]


def config(tmp_path: Path, ui: WebUI, redis_url: str, stream: str, mode: str = "static", retries: int = 3) -> Path:
    listing = orders_list() if mode == "static" else app_list()
    return scrape_config(tmp_path, ui, redis_url=redis_url, stream=stream, listing=listing, mode=mode,
                         with_detail=False, http={"timeout": TIMEOUT[mode], "retries": retries, "backoff": 0.01})


def test_static_mode_retries_timeouts_and_5xx_with_backoff(
    tmp_path: Path, webui: WebUI, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    path = config(tmp_path, webui, redis_url, stream_name)
    assert run_once(path).errors == []  # logged in; the session is saved for the next run
    webui.orders[1015].customer = "Nieuw BV"  # on page 2
    webui.fail_next = 1  # the first list page answers 503 once
    webui.stall["/orders?page=2"] = 2  # then page 2 hangs twice
    with capture_logs() as logs:
        result = run_once(path)
    assert result.errors == []
    assert webui.stalled == 2
    base = webui.url + "orders"
    assert retries_logged(logs) == [
        (f"GET {base}", "HTTP 503", 0.01),
        (f"GET {base}?page=2", "ReadTimeout", 0.01),
        (f"GET {base}?page=2", "ReadTimeout", 0.02),  # the backoff doubles for each retry of a request
    ]
    assert [e["event"]["subject"] for e in read_stream(redis_client, stream_name)][25:] == ["1015"]


def test_static_mode_out_of_retries_fails_the_run_and_commits_nothing(
    tmp_path: Path, webui: WebUI, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    path = config(tmp_path, webui, redis_url, stream_name, retries=2)
    assert run_once(path).errors == []
    before, _ = source_state(tmp_path)
    webui.orders[1001].customer = "Nieuw BV"  # page 1 is read, then page 2 never answers
    webui.orders[1025].paid = not webui.orders[1025].paid  # page 3 is never reached
    webui.stall["/orders?page=2"] = 10
    result = run_once(path)
    assert len(result.errors) == 1
    error = result.errors[0]
    assert f"source 'web-orders': GET {webui.url}orders?page=2 failed 3 time(s): ReadTimeout" in error
    assert webui.stalled == 3
    after, recorded = source_state(tmp_path)
    assert after == before
    assert recorded is not None and "ReadTimeout" in recorded
    assert redis_client.xlen(stream_name) == 25  # the change read on page 1 was not delivered
    webui.stall.clear()
    assert run_once(path).errors == []  # the next run reads everything and delivers both changes
    assert sorted(e["event"]["subject"] for e in read_stream(redis_client, stream_name)[25:]) == ["1001", "1025"]


@needs_browser
def test_browser_mode_retries_timeouts_and_5xx_then_fails_when_out_of_retries(
    tmp_path: Path, webui: WebUI, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    path = config(tmp_path, webui, redis_url, stream_name, mode="browser", retries=2)
    assert run_once(path).errors == []
    webui.orders[1015].customer = "Nieuw BV"
    webui.fail_next = 1
    webui.stall["/app/orders?page=2"] = 1
    with capture_logs() as logs:
        assert run_once(path).errors == []
    assert [(error, delay) for _, error, delay in retries_logged(logs)] == [("HTTP 503", 0.01), ("TimeoutError", 0.01)]
    assert [e["event"]["subject"] for e in read_stream(redis_client, stream_name)][25:] == ["1015"]
    before, _ = source_state(tmp_path)
    webui.orders[1016].customer = "Ander BV"
    webui.stall["/app/orders?page=2"] = 10
    result = run_once(path)
    assert len(result.errors) == 1
    assert f"GET {webui.url}app/orders?page=2 failed 3 time(s): TimeoutError" in result.errors[0]
    assert source_state(tmp_path)[0] == before
    assert redis_client.xlen(stream_name) == 26
