"""`straw run` as a service: a process with two sources on different schedules, scraped over HTTP,
its status page loaded in the real Chromium, stopped by SIGTERM."""

from __future__ import annotations

import importlib.util
import os
import signal
import sqlite3
from contextlib import closing
from pathlib import Path

import httpx
import pytest
import redis
import yaml

from straw.local_redis import free_port
from tests.bigtable import big_table, items_config
from tests.crashes import spawn_straw, tail
from tests.test_metrics import parse
from tests.test_web import wait_for

CHROMIUM = Path("/usr/bin/chromium")
FIRST, MORE = 30, 12

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("playwright") is None or not CHROMIUM.exists(),
    reason="the status page test needs Playwright and Chromium at /usr/bin/chromium (scripts/test.sh installs them)",
)


def two_sources(directory: Path, legacy: Path, redis_url: str, stream: str, port: int) -> Path:
    """`fast` polls the table every 50 ms, `slow` every 1.5 s: both publish every row to one stream."""
    path = items_config(directory, db_url=big_table(legacy, FIRST), redis_url=redis_url, stream=stream)
    config = yaml.safe_load(path.read_text())
    fast = {**config["sources"][0], "name": "fast"}
    slow = {**fast, "name": "slow", "poll_interval": "1.5s"}
    config.update(sources=[fast, slow], metrics={"port": port}, log={"format": "keyvalue", "polls": "all"})
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_a_straw_service_is_scraped_shown_in_chromium_and_stopped_by_sigterm(
    tmp_path: Path, redis_client: redis.Redis, redis_url: str, stream_name: str
) -> None:
    from playwright.sync_api import expect, sync_playwright

    legacy, port = tmp_path / "legacy.db", free_port()
    path = two_sources(tmp_path, legacy, redis_url, stream_name, port)
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        proc = spawn_straw(path, out)
        try:
            status = wait_for(f"{base}/status.json", lambda r: r.status_code == 200
                              and r.json()["streams"][0]["length"] == 2 * FIRST, timeout=60).json()
            assert status["streams"][0]["length"] == 2 * FIRST, tail(log)
            assert {s["source"]: s["read"] for s in status["sources"]} == {"fast": FIRST, "slow": FIRST}
            samples = parse(httpx.get(f"{base}/metrics", timeout=5).text)
            assert samples[("straw_stream_published_records_total", (("stream", stream_name),))] == 2 * FIRST
            assert samples[("straw_poll_duration_seconds_count", (("source", "fast"),))] > \
                samples[("straw_poll_duration_seconds_count", (("source", "slow"),))] >= 1

            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=str(CHROMIUM))
                page = browser.new_page()
                page.goto(f"{base}/")
                expect(page).to_have_title("straw test")
                for name in ("fast", "slow"):
                    row = page.locator(f'#sources tr[data-source="{name}"]')
                    expect(row.locator("td").nth(1)).to_have_text("ok")
                    expect(row.locator("td").nth(3)).to_have_text(str(FIRST))
                expect(page.locator(f'#streams tr[data-stream="{stream_name}"] svg rect')).not_to_have_count(1)
                with closing(sqlite3.connect(legacy)) as db:  # new legacy rows: the page shows the next polls
                    db.execute("INSERT INTO ITEMS (ID, V) SELECT ID + 1000, 'new' FROM ITEMS WHERE ID <= ?", (MORE,))
                    db.commit()
                for name in ("fast", "slow"):  # the page refreshes itself every 5 s
                    cell = page.locator(f'#sources tr[data-source="{name}"] td').nth(3)
                    expect(cell).to_have_text(str(FIRST + MORE), timeout=20_000)
                browser.close()

            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0, tail(log)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert int(redis_client.xlen(stream_name)) == 2 * (FIRST + MORE)
    lines = log.read_text().splitlines()
    assert any("stopped by SIGTERM" in line for line in lines), tail(log)
    polls = [line for line in lines if "event='polled'" in line]
    assert any("source='slow'" in line for line in polls) and any("source='fast'" in line for line in polls)
    assert all("seconds=" in line and "rows=" in line for line in polls)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{base}/healthz", timeout=2)
