"""`straw preview --screenshot`: the fixture UI's page with each field's matches outlined in its colour.

The boxes the outlines must sit on are measured independently: the test logs in with its own
browser, opens the same page and asks Chromium where the cells are. The PNG is then read
pixel by pixel at those boxes' edges.
"""

from __future__ import annotations

import importlib.util
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine

from adapters.scrape.screenshot import BANNER, BORDER_PX, COLOURS
from fixtures.legacy_orders import create_orders
from fixtures.webui import WebUI, start_webui
from fixtures.webui.configs import app_list, orders_list, scrape_config
from fixtures.webui.server import PASSWORD, USER
from tests.helpers import orders_config
from tests.test_cli import invoke, lines

BROWSER_OK = (
    importlib.util.find_spec("playwright") is not None
    and importlib.util.find_spec("PIL") is not None
    and Path("/usr/bin/chromium").exists()
)
pytestmark = pytest.mark.skipif(not BROWSER_OK, reason="no Playwright/Chromium/Pillow")

# The fields of orders_list() / app_list(), in configuration order: each field's colour is its place.
FIELDS = ["order_no", "customer", "order_date", "amount", "paid"]


@pytest.fixture
def webui() -> Iterator[WebUI]:
    ui = start_webui(25)
    yield ui
    ui.stop()


def rgb(colour: str) -> tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


def colour_of(field: str) -> tuple[int, int, int]:
    return rgb(COLOURS[FIELDS.index(field)])


def near(pixel: Any, colour: tuple[int, int, int]) -> bool:
    return all(abs(int(a) - b) <= 10 for a, b in zip(pixel[:3], colour, strict=True))


def boxes(ui: WebUI, path: str, cells: dict[str, str]) -> dict[str, list[dict[str, float]]]:
    """Where Chromium lays out each field's cells, in a session of the test's own."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(ui.url + "login")
            page.fill("input[name=UserName]", USER)
            page.fill("input[name=Password]", PASSWORD)
            with page.expect_navigation():
                page.click("form#loginForm [type=submit]")
            page.goto(ui.url + path)
            page.wait_for_selector(next(iter(cells.values())))
            found = {field: [b for b in (c.bounding_box() for c in page.locator(css).all()) if b is not None]
                     for field, css in cells.items()}
        finally:
            browser.close()
    return found


def outlined(image: Any, box: dict[str, float], colour: tuple[int, int, int]) -> bool:
    """The box's left and right edges, half-way down, carry the outline's colour."""
    middle = int(box["y"] + box["height"] / 2)
    left = int(box["x"]) + 1
    right = int(box["x"] + box["width"]) - 2
    return near(image.getpixel((left, middle)), colour) and near(image.getpixel((right, middle)), colour)


def test_static_preview_screenshot_outlines_every_fields_cells(
    tmp_path: Path, webui: WebUI, redis_url: str, stream_name: str
) -> None:
    from PIL import Image

    path = scrape_config(tmp_path, webui, redis_url=redis_url, stream=stream_name, listing=orders_list())
    shot = tmp_path / "shots" / "orders.png"
    result = invoke("preview", "web-orders", "--config", str(path), "--limit", "3", "--screenshot", str(shot))
    assert result.exit_code == 0, result.output
    assert any(f"screenshot: {shot}" in line and "amount 10" in line for line in lines(result.output))
    assert stat.S_IMODE(shot.stat().st_mode) == 0o600  # a logged-in page
    expected = boxes(webui, "orders", {
        "order_no": "table#orders tr.row td:nth-child(1)", "amount": "table#orders tr.row td.amt",
        "paid": "table#orders tr.row td:nth-child(5)",
    })
    image = Image.open(shot).convert("RGB")
    for field, found in expected.items():
        assert len(found) == 10
        for box in found:
            assert outlined(image, box, colour_of(field)), (field, box)
    # Outlines, not fills: inside a cell (past the border and its label) the page shows through.
    inner = expected["amount"][-1]
    assert not near(image.getpixel((int(inner["x"] + inner["width"] / 2), int(inner["y"] + BORDER_PX + 2))),
                    colour_of("amount"))
    assert not near(image.getpixel((image.width - 5, 5)), rgb(BANNER))  # every field matched: no banner
    assert not (tmp_path / "outbox.db").exists() and not (tmp_path / "session.json").exists()


def test_screenshot_after_layout_drift_lists_the_unmatched_required_field_in_a_banner(
    tmp_path: Path, webui: WebUI, redis_url: str, stream_name: str
) -> None:
    from PIL import Image

    path = scrape_config(tmp_path, webui, redis_url=redis_url, stream=stream_name, listing=orders_list())
    webui.layout = "v2"  # the amount cells lost their class `amt`
    shot = tmp_path / "drift.png"
    result = invoke("preview", "web-orders", "--config", str(path), "--limit", "3", "--screenshot", str(shot))
    assert result.exit_code == 1, result.output
    out = lines(result.output)
    assert any("required fields that matched nothing: amount (css 'td.amt')" in line for line in out)
    expected = boxes(webui, "orders", {"order_no": "tr.row td:nth-child(1)", "amount": "tr.row td:nth-child(4)"})
    image = Image.open(shot).convert("RGB")
    assert near(image.getpixel((image.width - 5, 5)), rgb(BANNER))
    for box in expected["order_no"]:
        assert outlined(image, box, colour_of("order_no"))
    for box in expected["amount"]:  # what the amount cells are now: not outlined
        assert not outlined(image, box, colour_of("amount"))
    assert not (tmp_path / "debug").exists()


def test_browser_preview_screenshot_shows_the_script_built_grid(
    tmp_path: Path, webui: WebUI, redis_url: str, stream_name: str
) -> None:
    from PIL import Image

    path = scrape_config(tmp_path, webui, redis_url=redis_url, stream=stream_name, listing=app_list(),
                         with_detail=False, mode="browser")
    shot = tmp_path / "grid.png"
    result = invoke("preview", "web-orders", "--config", str(path), "--limit", "2", "--screenshot", str(shot))
    assert result.exit_code == 0, result.output
    # The grid's fourth column, Amount (app_list() reads it by its header), built by the page's script.
    expected = boxes(webui, "app/orders", {"amount": f"{app_list()['rows']} td:nth-child(4)"})
    image = Image.open(shot).convert("RGB")
    assert len(expected["amount"]) == 10
    for box in expected["amount"]:
        assert outlined(image, box, colour_of("amount")), box


def test_screenshot_of_a_database_source_is_refused(tmp_path: Path, redis_url: str, stream_name: str) -> None:
    url = f"sqlite:///{tmp_path / 'legacy.db'}"
    engine = create_engine(url)
    create_orders(engine, 3)
    engine.dispose()
    path = orders_config(tmp_path, db_url=url, redis_url=redis_url, stream=stream_name)
    result = invoke("preview", "orders", "--config", str(path), "--screenshot", str(tmp_path / "x.png"))
    assert result.exit_code == 2
    assert "not a scrape source" in result.output
    assert not (tmp_path / "x.png").exists()


def test_an_unwritable_screenshot_path_is_one_line_and_exit_1(
    tmp_path: Path, webui: WebUI, redis_url: str, stream_name: str
) -> None:
    path = scrape_config(tmp_path, webui, redis_url=redis_url, stream=stream_name, listing=orders_list())
    (tmp_path / "file").write_text("not a folder")
    result = invoke("preview", "web-orders", "--config", str(path), "--limit", "1",
                    "--screenshot", str(tmp_path / "file" / "x.png"))
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert any(f"--screenshot: cannot write {tmp_path / 'file' / 'x.png'}" in line for line in lines(result.output)), \
        result.output
