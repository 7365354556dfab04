"""Page encodings by beautifulsoup4's detection: declared first (BOM, header, meta, XML declaration), then detection.

A page that declares UTF-8 but holds windows-1252 bytes (common on old intranets) must read as
windows-1252, not as U+FFFD; one that no encoding reads whole is a warning naming its URL.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import yaml
from structlog.testing import capture_logs

from adapters.scrape.page import decode
from fixtures.webui import WebUI, start_webui
from fixtures.webui.pages import CP1252_NAMES, LATIN1_NAMES, encoding_page
from tests.helpers import read_stream, run_once

BROWSER_OK = importlib.util.find_spec("playwright") is not None and Path("/usr/bin/chromium").exists()
KINDS = ["utf8-cp1252", "latin1", "bom", "xml"]


def names(kind: str) -> list[str]:
    return LATIN1_NAMES if kind == "latin1" else CP1252_NAMES


@pytest.mark.parametrize("kind", KINDS)
def test_fixture_pages_decode_without_replacement_characters(kind: str) -> None:
    found = encoding_page(kind)
    assert found is not None
    body, content_type = found
    with capture_logs() as logs:
        text = decode(body, content_type, url=f"http://ui/enc/{kind}")
    assert "\ufffd" not in text and "\ufeff" not in text
    for name in names(kind):
        assert name.replace("&", "&amp;") in text
    assert not [e for e in logs if e["log_level"] == "warning"]


def test_a_page_no_encoding_reads_is_a_warning_naming_the_url() -> None:
    found = encoding_page("broken")
    assert found is not None
    with capture_logs() as logs:
        decode(*found, url="http://ui/enc/broken")
    # Without a detector installed the unreadable byte becomes U+FFFD (the rest read as windows-1252);
    # with charset-normalizer or chardet the encoding is guessed. Either way: a warning naming the page.
    [warning] = [e for e in logs if e["log_level"] == "warning"]
    assert warning["url"] == "http://ui/enc/broken"
    assert "U+FFFD" in warning["event"] or "guessed" in warning["event"]


def test_declared_encoding_is_tried_first_and_a_forced_one_wins() -> None:
    # Valid UTF-8 that is also valid windows-1252: the declaration decides, no guessing.
    body = "Zoë".encode()
    assert decode(body, "text/html; charset=utf-8") == "Zoë"
    assert decode(body, "text/html; charset=windows-1252") == "ZoÃ«"
    assert decode(b'<meta charset="windows-1252">' + body, None).endswith("ZoÃ«")
    assert decode(body, "text/html; charset=windows-1252", forced="utf-8") == "Zoë"


@pytest.fixture
def webui() -> Iterator[WebUI]:
    ui = start_webui(5)
    yield ui
    ui.stop()


def names_config(directory: Path, ui: WebUI, redis_url: str, stream: str, kind: str, mode: str) -> Path:
    source = {
        "name": "web-names", "kind": "scrape", "mode": mode, "base_url": ui.url, "entity": "name", "stream": stream,
        "http": {"retries": 0}, "debug_dir": str(directory / "debug"),
        "list": {"url": f"enc/{kind}", "rows": "table#names tr.row",
                 "fields": {"no": {"column": "No", "parse": "integer", "required": True}, "name": {"column": "Name"}}},
    }
    config = {
        "instance": "test", "redis": {"url": redis_url}, "outbox": {"path": str(directory / "outbox.db")},
        "relay": {"idle_interval": 0.02}, "entities": {"name": {"key": ["no"], "fields": {"no": "integer",
                                                                                             "name": "string"}}},
        "sources": [source],
    }
    path = directory / "straw.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True))
    return path


MODES = ["static", pytest.param("browser", marks=pytest.mark.skipif(not BROWSER_OK, reason="no Playwright/Chromium"))]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["utf8-cp1252", "latin1", "bom", "xml"])
def test_scraped_names_are_exact_in_every_encoding(
    tmp_path: Path, webui: WebUI, redis_url: str, redis_client: redis.Redis, stream_name: str, kind: str, mode: str
) -> None:
    if mode == "browser" and kind == "utf8-cp1252":
        pytest.skip("Chromium decodes the page itself; covered by the warning test below")
    path = names_config(tmp_path, webui, redis_url, stream_name, kind, mode)
    assert run_once(path).errors == []
    got = [e["event"]["data"]["name"] for e in read_stream(redis_client, stream_name)]
    assert got == names(kind)


@pytest.mark.parametrize("mode", MODES)
def test_a_page_read_with_replacement_characters_warns_with_its_url(
    tmp_path: Path, webui: WebUI, redis_url: str, redis_client: redis.Redis, stream_name: str, mode: str
) -> None:
    kind = "broken" if mode == "static" else "utf8-cp1252"  # Chromium trusts the declaration: U+FFFD
    path = names_config(tmp_path, webui, redis_url, stream_name, kind, mode)
    with capture_logs() as logs:
        assert run_once(path).errors == []
    warnings = [e for e in logs if e["log_level"] == "warning" and ("U+FFFD" in e["event"] or "guessed" in e["event"])]
    assert warnings and warnings[0]["url"] == f"{webui.url}enc/{kind}"
