"""`straw preview` and `straw check` on a scrape source: what each selector finds, nothing written."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import redis

from fixtures.webui import WebUI, start_webui
from fixtures.webui.configs import app_list, orders_list, scrape_config
from tests.helpers import run_once
from tests.test_cli import invoke, lines


@pytest.fixture
def webui() -> Iterator[WebUI]:
    ui = start_webui(35)
    yield ui
    ui.stop()


def test_preview_shows_records_and_flags_selectors_that_match_nothing(
    tmp_path: Path, webui: WebUI, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    listing = orders_list()
    listing["fields"]["paid"] = {"xpath": "./td[9]", "parse": "boolean"}  # a column the table does not have
    path = scrape_config(tmp_path, webui, redis_url=redis_url, stream=stream_name, listing=listing)
    result = invoke("preview", "web-orders", "--config", str(path), "--limit", "3")
    assert result.exit_code == 0, result.output
    out = lines(result.output)
    assert any("1003" in line and "Œuvre SARL" in line and "INVOICED" in line for line in out)
    assert not any("1004" in line for line in out)
    assert any("paid" in line and "xpath './td[9]'" in line and "0/3" in line for line in out)
    assert any("amount *" in line and "css 'td.amt'" in line and "3/3" in line for line in out)
    assert any("status *" in line and "css '#status'" in line and "3/3" in line for line in out)
    assert webui.hits.get("/order/1004") is None  # only the previewed rows' detail pages were read
    assert redis_client.xlen(stream_name) == 0
    assert not (tmp_path / "outbox.db").exists()
    assert not (tmp_path / "session.json").exists()  # logged in, but no session kept: writes nothing


def test_check_reads_the_first_page(tmp_path: Path, webui: WebUI, redis_url: str, stream_name: str) -> None:
    path = scrape_config(tmp_path, webui, redis_url=redis_url, stream=stream_name, listing=orders_list())
    result = invoke("check", "--config", str(path))
    source_line = next(line for line in lines(result.output) if "source web-orders" in line)
    assert source_line.startswith("ok"), result.output
    assert "static mode" in source_line and f"{webui.url}orders" in source_line


def test_preview_after_layout_drift_shows_every_selector_and_writes_nothing(
    tmp_path: Path, webui: WebUI, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    path = scrape_config(tmp_path, webui, redis_url=redis_url, stream=stream_name, listing=orders_list())
    webui.layout = "v2"  # the amount cells lost their class: a required field matches nothing
    result = invoke("preview", "web-orders", "--config", str(path), "--limit", "3")
    assert result.exit_code == 1, result.output
    out = lines(result.output)
    assert any("layout drift" in line and "field 'amount'" in line for line in out)
    assert any("(rows)" in line and "table#orders tr.row" in line and "10/10" in line for line in out)
    assert any("order_no *" in line and "10/10" in line and "1001" in line for line in out)
    assert any("customer" in line and "Café Müller" in line for line in out)
    assert any("amount *" in line and "css 'td.amt'" in line and "0/10" in line and "matched nothing" in line
               for line in out)
    assert not (tmp_path / "debug").exists()  # "writes nothing": no debug page either
    assert redis_client.xlen(stream_name) == 0
    assert not (tmp_path / "outbox.db").exists()


def test_preview_after_drift_on_a_detail_page_shows_the_detail_fields(
    tmp_path: Path, webui: WebUI, redis_url: str, stream_name: str
) -> None:
    path = scrape_config(tmp_path, webui, redis_url=redis_url, stream=stream_name, listing=orders_list())
    webui.broken_detail = 1002
    result = invoke("preview", "web-orders", "--config", str(path), "--limit", "3")
    assert result.exit_code == 1, result.output
    out = lines(result.output)
    assert any("status *" in line and "0/1" in line and "matched nothing" in line for line in out)
    assert any("note" in line and "1/1" in line and "Levering 2" in line for line in out)
    assert not (tmp_path / "debug").exists()


def test_preview_names_a_regex_that_did_not_match_and_a_failed_parse(
    tmp_path: Path, webui: WebUI, redis_url: str, stream_name: str
) -> None:
    listing = orders_list()
    listing["fields"]["customer"] = {"column": "Klant", "regex": r"^(\d+)$"}
    listing["fields"]["order_date"] = {"column": "Datum", "parse": {"type": "date", "format": "%Y/%m/%d"}}
    listing["fields"]["amount"] = {"css": "td.nothing", "required": True}
    path = scrape_config(tmp_path, webui, redis_url=redis_url, stream=stream_name, listing=listing)
    result = invoke("preview", "web-orders", "--config", str(path))
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "'Café Müller' does not match regex /^(\\d+)$/" in text
    assert "cannot read '01-01-2026' as a date (format '%Y/%m/%d', locale 'en')" in text


def test_status_in_a_pipe_or_as_json_shows_the_whole_error(
    tmp_path: Path, webui: WebUI, redis_url: str, stream_name: str
) -> None:
    path = scrape_config(tmp_path, webui, redis_url=redis_url, stream=stream_name, listing=orders_list(),
                         with_detail=False)
    webui.layout = "v2"
    errors = run_once(path).errors
    assert len(errors) == 1
    expected = f"source 'web-orders': layout drift on {webui.url}orders: field 'amount' (css 'td.amt') matched nothing"
    narrow = invoke("status", "--config", str(path), env={"COLUMNS": "60"})  # not a terminal, and narrow
    assert narrow.exit_code == 0, narrow.output
    assert any(expected in line for line in narrow.stdout.splitlines()), narrow.stdout  # one line, not cut
    as_json = invoke("status", "--config", str(path), "--json", env={"COLUMNS": "60"})
    assert as_json.exit_code == 0, as_json.output
    document = orjson.loads(as_json.stdout)
    (source,) = document["sources"]
    assert source["source"] == "web-orders" and expected in source["error"] and source["read"] == 0
    assert document["streams"][0]["stream"] == stream_name
    assert document["outbox"]["backlog"] == 0


@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="browser mode needs Chromium")
def test_preview_after_layout_drift_in_browser_mode(
    tmp_path: Path, webui: WebUI, redis_url: str, stream_name: str
) -> None:
    pytest.importorskip("playwright")
    listing = app_list()
    listing["fields"]["amount"] = {"css": "td.amount", "required": True}  # the grid's cells have no class
    path = scrape_config(tmp_path, webui, redis_url=redis_url, stream=stream_name, listing=listing,
                         mode="browser", with_detail=False)
    result = invoke("preview", "web-orders", "--config", str(path), "--limit", "3")
    assert result.exit_code == 1, result.output
    out = lines(result.output)
    assert any("(rows)" in line and "10/10" in line for line in out)  # rows built by the page's script
    assert any("customer" in line and "10/10" in line and "Café Müller" in line for line in out)
    assert any("amount *" in line and "0/10" in line and "matched nothing" in line for line in out)
    assert not (tmp_path / "debug").exists()  # no page, no screenshot
