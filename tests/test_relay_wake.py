"""The runner wakes the relay child after each outbox commit that added records (issue 14: the relay's idle look,
200 ms, was on average 100 ms of every change's latency). A hung or killed child: tests/test_relay_stop.py."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import redis
import yaml
from sqlalchemy import create_engine, insert

from fixtures.legacy_orders import create_orders, order_rows
from straw.config_load import load_config
from straw.runner import Runner
from tests.helpers import orders_config, read_stream

HOUR = 3600.0


def _subjects(client: redis.Redis, stream: str) -> list[str]:
    return [entry["event"]["subject"] for entry in read_stream(client, stream)]


def test_each_commit_wakes_a_relay_whose_idle_look_is_an_hour_away(
    tmp_path: Path, sqlite_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    engine = create_engine(sqlite_url)
    table = create_orders(engine, 0)
    path = orders_config(tmp_path, db_url=sqlite_url, redis_url=redis_url, stream=stream_name)
    config = yaml.safe_load(path.read_text())
    config["relay"]["idle_interval"] = HOUR  # only a wake can publish a row committed after the relay went idle
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    runner = Runner(load_config(path))
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    try:
        # One row at a time, each on the stream before the next is written: the relay is idle each time (an
        # early wake can buy one spare round, not five), so each row needs the wake of its own commit.
        for n in range(1, 6):
            with engine.begin() as conn:
                conn.execute(insert(table), order_rows(1, first=n))
            deadline = time.monotonic() + 60  # a generous bound on a one-hour idle look, not a latency figure
            while len(_subjects(redis_client, stream_name)) < n and time.monotonic() < deadline:
                time.sleep(0.02)
            assert _subjects(redis_client, stream_name) == [str(i) for i in range(1, n + 1)]
    finally:
        runner.stop.set()
        thread.join(timeout=30)
        engine.dispose()
    assert not thread.is_alive()
    assert _subjects(redis_client, stream_name) == ["1", "2", "3", "4", "5"]  # each once, in order
