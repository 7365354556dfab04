"""Hints for a field that matched nothing: the elements most like it, as selectors that work.

A hint is only worth printing if following it fixes the configuration: the end-to-end tests
put the hinted selector into the configuration and preview again.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree

from adapters.scrape.extract import Rule, compile_query, text_of
from adapters.scrape.hints import nearest
from fixtures.webui import WebUI, start_webui
from fixtures.webui.configs import orders_list, scrape_config
from straw.config_scrape import FieldRule
from tests.helpers import run_once
from tests.test_cli import invoke, lines


@pytest.fixture
def webui() -> Iterator[WebUI]:
    ui = start_webui(15)
    yield ui
    ui.stop()


def hint_lines(output: str, field: str) -> list[str]:
    out = lines(output)
    start = next(i for i, line in enumerate(out) if line.startswith(f"hint for {field}:"))
    return [line.strip() for line in out[start + 1 :] if line.startswith("  ")]


def test_drift_message_names_the_element_whose_class_is_like_the_selector(
    tmp_path: Path, webui: WebUI, redis_url: str, stream_name: str
) -> None:
    listing = orders_list()
    listing["fields"]["amount"]["css"] = "td.amnt"  # a typo for the page's td.amt
    path = scrape_config(tmp_path, webui, redis_url=redis_url, stream=stream_name, listing=listing)
    run_once(path)
    status = invoke("status", "--json", "--config", str(path))
    assert "nearest: td.amt '0,00 €' (class or id 'amt' is like 'amnt')" in status.output, status.output


def test_after_drift_the_hint_follows_the_published_values_and_fixes_the_config(
    tmp_path: Path, webui: WebUI, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    path = scrape_config(tmp_path, webui, redis_url=redis_url, stream=stream_name, listing=orders_list())
    run_once(path)
    assert redis_client.xlen(stream_name) == 15
    webui.layout = "v2"  # td.amt became td.bedrag: no class resemblance, only the values tell
    result = invoke("preview", "web-orders", "--config", str(path), "--limit", "3")
    assert result.exit_code == 1, result.output
    hints = hint_lines(result.output, "amount")
    assert hints and hints[0].startswith("td.bedrag") and "read before" in hints[0], result.output
    listing = orders_list()
    listing["fields"]["amount"]["css"] = hints[0].split()[0]
    fixed = scrape_config(tmp_path, webui, redis_url=redis_url, stream=stream_name, listing=listing)
    again = invoke("preview", "web-orders", "--config", str(fixed), "--limit", "3")
    assert again.exit_code == 0, again.output
    assert any("amount *" in line and "3/3" in line for line in lines(again.output))


def test_preview_hints_a_header_like_the_configured_column(
    tmp_path: Path, webui: WebUI, redis_url: str, stream_name: str
) -> None:
    listing = orders_list()
    listing["fields"]["paid"] = {"column": "Betald", "parse": "boolean"}  # the header says Betaald
    path = scrape_config(tmp_path, webui, redis_url=redis_url, stream=stream_name, listing=listing)
    result = invoke("preview", "web-orders", "--config", str(path), "--limit", "3")
    assert result.exit_code == 0, result.output
    assert any(h.startswith("column 'Betaald'") for h in hint_lines(result.output, "paid")), result.output
    with pytest.raises(StopIteration):  # fields that matched everywhere get no hints
        hint_lines(result.output, "amount")


# -- unit: a hint's selector always finds its element first, whatever the row looks like ---------------

_CLASSES = st.sampled_from(["amt", "amount", "amnt", "bedrag", "x", "a-b", "Amt"])


@st.composite
def rows(draw: st.DrawFn) -> str:
    def cell(depth: int) -> str:
        tag = draw(st.sampled_from(["td", "span", "div", "b"]))
        classes = " ".join(draw(st.lists(_CLASSES, max_size=2)))
        ident = draw(st.sampled_from(["", "", "amt", "n1"]))
        attrs = (f' class="{classes}"' if classes else "") + (f' id="{ident}"' if ident else "")
        inner = "".join(cell(depth + 1) for _ in range(draw(st.integers(0, 2 if depth < 2 else 0))))
        return f"<{tag}{attrs}>{draw(st.sampled_from(['0,00 €', '12.50', 'Ja', 'amt', '']))}{inner}</{tag}>"

    return "<table><tr>" + "".join(cell(0) for _ in range(draw(st.integers(1, 5)))) + "</tr></table>"


@given(rows(), st.sampled_from(["td.amt", "#amt", "td.amount", "span.bedrag"]), st.lists(
    st.sampled_from(["0.00", "12.5", "ja"]), max_size=2))
@settings(max_examples=150, deadline=None)
def test_every_hint_selector_finds_its_element_first(html: str, css: str, previous: list[str]) -> None:
    root = etree.HTML(html)
    row: Any = root.find(".//tr")
    for hint in nearest(Rule("f", FieldRule.model_validate({"css": css})), row, previous, limit=10):
        found = compile_query(hint.selector, None)(row)
        assert found, (html, hint)
        assert text_of(found[0]) == hint.text, (html, hint)
