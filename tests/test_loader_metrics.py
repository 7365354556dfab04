"""`loaders[].metrics`: a running `straw load` is scraped for what it applied, its dead letters, its lag behind
each stream, and when its last batch went through; a restarted one knows its lag before it applies anything."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import redis

from straw.config_load import ConfigError, load_config
from straw.local_redis import RedisServer, free_port
from straw.records import encode_event
from tests.crashes import REPO, straw_command, tail
from tests.loader_helpers import SOURCE, loader_config, order_data, xadd_events
from tests.test_metrics import Samples, parse


def _scrape_until(url: str, log: Path, done: Callable[[Samples], bool], what: str) -> Samples:
    samples: Samples = {}
    deadline = time.monotonic() + 60.0  # start-up alone takes seconds on a loaded machine
    while time.monotonic() < deadline:
        try:
            samples = parse(httpx.get(url, timeout=5.0).text)
        except httpx.TransportError:
            samples = {}  # not listening yet
        if samples and done(samples):
            return samples
        time.sleep(0.05)
    raise AssertionError(f"{what}: {samples} {tail(log)}")


def _start(config: Path, log: Path) -> subprocess.Popen[bytes]:
    """`straw load jl` in the background, its output appended to `log`."""
    with log.open("ab") as out:
        return subprocess.Popen(straw_command(config, "load", "jl"), cwd=REPO, stdout=out, stderr=subprocess.STDOUT)


def _stop(loader: subprocess.Popen[bytes]) -> None:
    loader.send_signal(signal.SIGTERM)
    assert loader.wait(timeout=60) == 0


def test_a_running_loader_is_scraped_for_applied_dead_letters_lag_and_its_last_batch(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    port = free_port()
    config = loader_config(tmp_path, redis_url, [{
        "name": "jl", "kind": "jsonl", "streams": [stream_name], "directory": str(tmp_path / "out"),
        "max_deliveries": 1, "block": "200ms", "metrics": {"port": port}}], stream_name)
    xadd_events(redis_client, stream_name, [("upserted", order_data(n)) for n in range(1, 31)])
    url, log = f"http://127.0.0.1:{port}/metrics", tmp_path / "load.log"
    me, at = (("loader", "jl"),), (("loader", "jl"), ("stream", stream_name))
    started = time.time()
    loader = _start(config, log)
    try:
        first = _scrape_until(url, log, lambda s: s.get(("straw_loader_records_applied_total", me)) == 30,
                              "30 applied")
        assert first[("straw_loader_stream_newest_seq", at)] == 30
        assert first[("straw_loader_applied_seq", at)] == 30
        assert first[("straw_loader_lag_records", at)] == 0
        assert first[("straw_loader_bus_up", me)] == 1
        assert first[("straw_loader_dead_letters_total", me)] == 0
        assert first[("straw_loader_batch_seconds_count", me)] >= 1
        assert started <= first[("straw_loader_last_batch_timestamp_seconds", me)] <= time.time()

        # A record no entity declares, between good ones: a dead letter at once (max_deliveries 1), counted.
        xadd_events(redis_client, stream_name, [("upserted", order_data(n)) for n in range(31, 34)], first_seq=31)
        poison = encode_event(source=SOURCE, entity="invoice", op="upserted", key="1", position="[34]",
                              time="2026-11-29T10:00:00Z", data={"invoice_no": 1})
        redis_client.xadd(stream_name, {"seq": 34, "pos": "[34]", "event": poison})
        xadd_events(redis_client, stream_name, [("upserted", order_data(35))], first_seq=35)
        later = _scrape_until(url, log, lambda s: s.get(("straw_loader_records_applied_total", me)) == 34,
                              "34 applied")
        assert later[("straw_loader_dead_letters_total", me)] == 1
        assert later[("straw_loader_deliveries_failed_total", me)] == 1
        assert later[("straw_loader_stream_newest_seq", at)] == 35
        assert later[("straw_loader_applied_seq", at)] == 35
        assert later[("straw_loader_lag_records", at)] == 0
    finally:
        if loader.poll() is None:
            _stop(loader)
    assert redis_client.xlen(f"{stream_name}.dlq") == 1

    # Restarted with nothing new on the stream: it applies nothing, yet knows where it stands (its files end
    # at seq 35), so its lag is there from the start: a loader that never gets a record is not "unknown".
    loader = _start(config, log)
    try:
        again = _scrape_until(url, log, lambda s: ("straw_loader_lag_records", at) in s, "a lag")
        assert again[("straw_loader_applied_seq", at)] == 35
        assert again[("straw_loader_lag_records", at)] == 0
        assert again[("straw_loader_records_applied_total", me)] == 0
        assert ("straw_loader_last_batch_timestamp_seconds", me) not in again
        xadd_events(redis_client, stream_name, [("upserted", order_data(n)) for n in range(36, 41)], first_seq=36)
        done = _scrape_until(url, log, lambda s: s.get(("straw_loader_applied_seq", at)) == 40, "40 applied")
        assert done[("straw_loader_lag_records", at)] == 0
        assert done[("straw_loader_records_applied_total", me)] == 5
    finally:
        _stop(loader)


def test_a_loaders_metrics_port_taken_by_another_is_one_line(tmp_path: Path) -> None:
    path = loader_config(tmp_path, "redis://127.0.0.1:6379/0", [
        {"name": "a", "kind": "jsonl", "streams": ["s"], "directory": "a", "metrics": {"port": 9470}},
        {"name": "b", "kind": "jsonl", "streams": ["s"], "directory": "b", "metrics": {"port": 9470}},
    ])
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    [problem] = [str(p) for p in caught.value.problems]
    assert "loaders[1].metrics.port: port 9470 is taken by loader a" in problem and problem.startswith(f"{path}:")


def test_a_taken_metrics_port_stops_the_start_with_one_line(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    xadd_events(redis_client, stream_name, [("upserted", order_data(1))])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = loader_config(tmp_path, redis_url, [{
            "name": "jl", "kind": "jsonl", "streams": [stream_name], "directory": str(tmp_path / "out"),
            "metrics": {"port": port}}], stream_name)
        ran = subprocess.run(straw_command(config, "load", "jl", "--once"), cwd=REPO, capture_output=True,
                             text=True, timeout=120)
    assert ran.returncode == 1
    assert ran.stderr.strip().splitlines()[-1] == (
        f"error loader jl: cannot serve metrics on 127.0.0.1:{port} (Address already in use): another process "
        "has it, or the address is not this host's; choose another `metrics.port` for this loader"), ran.stderr
    assert "Traceback" not in ran.stderr
    assert redis_client.xpending(stream_name, "jl")["pending"] == 0, "nothing read before the loader could start"


def test_with_the_bus_down_a_scrape_still_answers_and_says_so(tmp_path: Path, private_redis: RedisServer) -> None:
    client = redis.Redis.from_url(private_redis.url)
    xadd_events(client, "s", [("upserted", order_data(n)) for n in range(1, 6)])
    port = free_port()
    config = loader_config(tmp_path, private_redis.url, [{
        "name": "jl", "kind": "jsonl", "streams": ["s"], "directory": str(tmp_path / "out"), "block": "200ms",
        "metrics": {"port": port}}])
    url, log = f"http://127.0.0.1:{port}/metrics", tmp_path / "load.log"
    me, at = (("loader", "jl"),), (("loader", "jl"), ("stream", "s"))
    loader = _start(config, log)
    try:
        _scrape_until(url, log, lambda s: s.get(("straw_loader_lag_records", at)) == 0 and
                      s.get(("straw_loader_applied_seq", at)) == 5, "5 applied")
        private_redis.kill()
        began = time.monotonic()
        down = parse(httpx.get(url, timeout=10.0).text)
        assert time.monotonic() - began < 8.0, "a scrape waits for the bus at most its timeout"
        assert down[("straw_loader_bus_up", me)] == 0
        assert ("straw_loader_lag_records", at) not in down and ("straw_loader_stream_newest_seq", at) not in down
        assert down[("straw_loader_applied_seq", at)] == 5 and down[("straw_loader_records_applied_total", me)] == 5
        private_redis.start()
        _scrape_until(url, log, lambda s: s.get(("straw_loader_bus_up", me)) == 1 and
                      s.get(("straw_loader_lag_records", at)) == 0, "the bus back")
    finally:
        if loader.poll() is None:
            _stop(loader)
