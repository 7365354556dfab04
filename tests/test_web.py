"""The metrics port as operators meet it: /healthz, /readyz, /status.json, the new metrics, and the page."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import lxml.html
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from straw.config_load import load_config
from straw.local_redis import free_port
from straw.publish_history import PublishHistory
from straw.runner import Runner
from straw.status_page import render_page
from tests.bigtable import big_table, items_config
from tests.test_metrics import parse

ROWS = 40


def with_port(path: Path, port: int, **changes: Any) -> Path:
    config = yaml.safe_load(path.read_text())
    config["metrics"] = {"port": port}
    config.update(changes)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@contextmanager
def running(path: Path) -> Iterator[Runner]:
    """A continuous `straw run` in a thread, stopped (and joined) on the way out."""
    runner = Runner(load_config(path))
    thread = threading.Thread(target=runner.run)
    thread.start()
    try:
        yield runner
    finally:
        runner.stop.set()
        thread.join(timeout=30)
        assert not thread.is_alive()


def wait_for(url: str, ready: Any, timeout: float = 30.0) -> httpx.Response:
    """GET `url` until `ready(response)` holds; the last response either way."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            response = httpx.get(url, timeout=5.0)
            if ready(response) or time.monotonic() > deadline:
                return response
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.05)


def test_health_readiness_status_and_publish_metrics_of_a_running_straw(
    tmp_path: Path, redis_url: str, stream_name: str
) -> None:
    port = free_port()
    path = with_port(items_config(tmp_path, db_url=big_table(tmp_path / "legacy.db", ROWS), redis_url=redis_url,
                                  stream=stream_name), port)
    base = f"http://127.0.0.1:{port}"
    with running(path):
        # The source's published count follows the stream's length (the relay marks after its XADD): wait for both.
        status = wait_for(f"{base}/status.json", lambda r: r.status_code == 200 and
                          r.json()["streams"][0]["length"] == ROWS and r.json()["outbox"]["backlog"] == 0
                          and r.json()["sources"][0]["published"] == ROWS)
        health = httpx.get(f"{base}/healthz", timeout=5.0)
        ready = httpx.get(f"{base}/readyz", timeout=5.0)
        metrics = parse(httpx.get(f"{base}/metrics", timeout=5.0).text)
        missing = httpx.get(f"{base}/nothing-here", timeout=5.0)
        page = httpx.get(f"{base}/", timeout=5.0)

    assert (health.status_code, health.text) == (200, "ok\n")
    assert ready.status_code == 200, ready.text
    checks = {c["name"]: c for c in ready.json()["checks"]}
    assert ready.json()["ready"] is True
    assert [checks[n]["ok"] for n in ("config", "outbox", "redis", "lease")] == [True] * 4
    assert checks["lease"]["detail"] == "no lease configured"

    document = status.json()
    assert document["instance"] == "test"
    [source] = document["sources"]
    assert (source["source"], source["state"], source["read"], source["published"]) == ("items", "ok", ROWS, ROWS)
    [stream] = document["streams"]
    assert stream["stream"] == stream_name and stream["backlog"] == 0 and stream["oldest_unpublished_age"] is None
    assert sum(stream["published_last_hour"]) == ROWS and len(stream["published_last_hour"]) == 60

    labels = (("stream", stream_name),)
    assert metrics[("straw_stream_published_records_total", labels)] == ROWS
    assert metrics[("straw_relay_publish_seconds_count", labels)] >= 1
    assert metrics[("straw_stream_oldest_unpublished_age_seconds", labels)] == 0
    assert missing.status_code == 404
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'data-source="items"' in page.text


def test_readyz_says_503_and_why_when_redis_is_unreachable_without_showing_its_password(
    tmp_path: Path, stream_name: str
) -> None:
    port = free_port()
    dead_redis = f"redis://:hunter2-secret@127.0.0.1:{free_port()}/0"
    path = with_port(items_config(tmp_path, db_url=big_table(tmp_path / "legacy.db", 3), redis_url=dead_redis,
                                  stream=stream_name), port)
    base = f"http://127.0.0.1:{port}"
    with running(path):
        ready = wait_for(f"{base}/readyz", lambda r: r.status_code == 503)
        health = httpx.get(f"{base}/healthz", timeout=5.0)
        page = httpx.get(f"{base}/", timeout=5.0)
    assert ready.status_code == 503
    checks = {c["name"]: c for c in ready.json()["checks"]}
    assert checks["redis"]["ok"] is False and "unreachable" in checks["redis"]["detail"]
    assert checks["config"]["ok"] and checks["lease"]["ok"]
    assert health.status_code == 200  # alive, only not ready: a restart would not bring Redis back
    for text in (ready.text, page.text):
        assert "hunter2" not in text


def test_old_entries_are_trimmed_by_max_age_while_new_ones_stay(
    tmp_path: Path, redis_url: str, stream_name: str
) -> None:
    import redis as redis_lib

    client = redis_lib.Redis.from_url(redis_url)
    old_ms = int((time.time() - 7200) * 1000)
    for i in range(500):  # two hours old: beyond the one hour kept
        client.xadd(stream_name, {"old": i}, id=f"{old_ms}-{i}")
    path = items_config(tmp_path, db_url=big_table(tmp_path / "legacy.db", ROWS), redis_url=redis_url,
                        stream=stream_name)
    config = yaml.safe_load(path.read_text())
    config["retention"] = {"streams": {stream_name: "1h"}, "interval": 1}
    path.write_text(yaml.safe_dump(config))
    result = Runner(load_config(path)).run(once=True, wait=10.0)
    assert not result.errors
    entries = client.xrange(stream_name)
    client.close()
    assert [f for _id, f in entries if b"old" in f] == []
    assert sum(1 for _id, f in entries if b"event" in f) == ROWS  # what was published stays


@settings(max_examples=60, deadline=None)
@given(error=st.text(min_size=1, max_size=200), position=st.text(max_size=50))
def test_the_page_shows_hostile_legacy_text_as_text(error: str, position: str) -> None:
    document = {
        "instance": "test",
        "counts": {"error": 1, "new": 0, "ok": 0},
        "outbox": {"path": "x", "backlog": 0},
        "sources": [{"source": "items", "state": "error", "position": position, "last_poll": "never", "read": 0,
                     "published": 0, "dead_letters": 0, "error": error}],
        "streams": [{"stream": "s", "backlog": 1, "length": None, "oldest_unpublished_age": 3.0,
                     "last_publish": "never", "error": error, "published_last_hour": [0] * 59 + [5]}],
    }
    tree = lxml.html.fromstring(render_page(document))
    cells = tree.xpath("//td[@class='err']")
    # lxml, as browsers do, reads a NUL or a lone surrogate as U+FFFD and a CR (or CR LF) as LF (HTML's
    # newline normalisation); everything else comes back as written
    shown = error.replace("\r\n", "\n").replace("\r", "\n")
    expected = "".join("\ufffd" if c == "\0" or "\ud800" <= c <= "\udfff" else c for c in shown).strip()
    assert [c.text_content().strip() for c in cells] == [expected, expected]
    assert tree.xpath("//script") == [] and tree.xpath("//*[@onerror or @onload]") == []


def test_publish_history_keeps_the_last_hour_by_minute() -> None:
    now = [1_000_000.0 * 60]
    history = PublishHistory(clock=lambda: now[0])
    history.add("s", 5)
    now[0] += 59 * 60
    history.add("s", 7)
    assert history.last_hour("s")[0] == 5 and history.last_hour("s")[-1] == 7
    now[0] += 60  # the first minute has left the hour
    assert sum(history.last_hour("s")) == 7 and history.last_hour("other") == [0] * 60
