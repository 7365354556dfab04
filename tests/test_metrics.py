"""The Prometheus endpoint as a scraper meets it: scraped over HTTP while straw runs, gone when it stops."""

from __future__ import annotations

import socket
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine

from fixtures.legacy_orders import create_orders
from outbox.store import Outbox
from straw.config_load import ConfigError, load_config
from straw.local_redis import free_port
from straw.runner import Runner, RunResult
from tests.helpers import orders_config

ROWS = 30

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample as {(name, sorted labels): value}; `le` stays a label of histogram buckets."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def with_metrics(path: Path, port: int, **metrics: Any) -> Path:
    config = yaml.safe_load(path.read_text())
    config["metrics"] = {"port": port, **metrics}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_a_running_straw_is_scraped_over_http_and_stops_serving_when_stopped(
    tmp_path: Path, sqlite_url: str, redis_url: str, stream_name: str
) -> None:
    engine = create_engine(sqlite_url)
    create_orders(engine, ROWS)
    engine.dispose()
    port = free_port()
    path = with_metrics(orders_config(tmp_path, db_url=sqlite_url, redis_url=redis_url, stream=stream_name), port)
    runner = Runner(load_config(path))
    results: list[RunResult] = []
    thread = threading.Thread(target=lambda: results.append(runner.run()))  # continuous: serves until stopped
    started = time.time()
    thread.start()
    url = f"http://127.0.0.1:{port}/metrics"
    source, stream = (("source", "orders"),), (("stream", stream_name),)
    try:
        samples: Samples = {}
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:  # wait for the run to catch up; what it then shows is asserted below
            try:
                samples = parse(httpx.get(url, timeout=5.0).text)
            except httpx.TransportError:
                samples = {}  # not listening yet
            if samples.get(("straw_source_rows_read_total", source)) == ROWS and \
                    samples.get(("straw_stream_backlog_records", stream)) == 0 and \
                    samples.get(("straw_poll_duration_seconds_count", source), 0) > 0:
                break  # (the poll's duration is observed after its commit, which the relay may publish first)
            time.sleep(0.05)
    finally:
        runner.stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive()

    assert samples[("straw_source_rows_read_total", source)] == ROWS
    assert samples[("straw_stream_backlog_records", stream)] == 0
    outbox = Outbox(tmp_path / "outbox.db")
    try:
        assert samples[("straw_stream_published_seq", stream)] == outbox.published_seq(stream_name) > 0
    finally:
        outbox.close()
    assert samples[("straw_stream_error", stream)] == 0
    assert samples[("straw_source_error", source)] == 0
    assert samples[("straw_dead_letters", source)] == 0
    assert started - 1 <= samples[("straw_source_last_poll_timestamp_seconds", source)] <= time.time() + 1
    assert samples[("straw_poll_duration_seconds_count", source)] > 0
    assert samples[("straw_poll_errors_total", source)] == 0
    labels = {value for _name, pairs in samples for key, value in pairs if key != "le"}
    assert labels == {"orders", stream_name}  # names only: never a URL

    with pytest.raises(httpx.TransportError):  # the run has ended: nothing listens any more
        httpx.get(url, timeout=5.0)
    assert results and results[0].backlog == 0


def test_a_failing_source_shows_as_an_error_and_a_counted_failure(
    tmp_path: Path, sqlite_url: str, redis_url: str, stream_name: str
) -> None:
    create_engine(sqlite_url).dispose()
    path = with_metrics(
        orders_config(tmp_path, db_url=sqlite_url, redis_url=redis_url, stream=stream_name, table="NO_SUCH_TABLE"),
        free_port(),
    )
    runner = Runner(load_config(path))
    result = runner.run(once=True, wait=10.0)
    assert result.errors and result.errors[0].startswith("orders: ")

    assert runner.metrics is not None
    text = generate_latest(runner.metrics.registry).decode()  # the collector reads the outbox afresh
    samples = parse(text)
    source = (("source", "orders"),)
    assert samples[("straw_source_error", source)] == 1
    assert samples[("straw_poll_errors_total", source)] == 1
    assert samples[("straw_poll_duration_seconds_count", source)] == 1
    assert samples[("straw_source_rows_read_total", source)] == 0
    assert "legacy.db" not in text  # the error text (and the URL in it) stays in the log and `straw status`


def test_a_taken_port_fails_the_run_before_it_starts(
    tmp_path: Path, sqlite_url: str, redis_url: str, stream_name: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = with_metrics(orders_config(tmp_path, db_url=sqlite_url, redis_url=redis_url, stream=stream_name), port)
        result = Runner(load_config(path)).run(once=True)
    assert result.errors == [f"metrics: cannot listen on 127.0.0.1:{port}: Address already in use"]
    assert not (tmp_path / "outbox.db").exists()  # nothing was started


CONFIG = textwrap.dedent(
    """\
    instance: test
    metrics:
      port: {port}
    entities:
      order: {{key: [order_no], fields: {{order_no: integer}}}}
    sources:
      - {{name: orders, url: 'sqlite:///legacy.db', table: ORDERS, mode: incrementing,
         incrementing_column: ORDER_NO, entity: order, stream: erp.orders}}
    """
)


def test_metrics_are_off_unless_configured_and_listen_on_loopback_by_default(tmp_path: Path) -> None:
    without = tmp_path / "without.yaml"
    without.write_text(CONFIG.replace("metrics:\n  port: {port}\n", "").format())
    assert load_config(without).metrics is None
    path = tmp_path / "straw.yaml"
    path.write_text(CONFIG.format(port=9108))
    metrics = load_config(path).metrics
    assert metrics is not None and (metrics.host, metrics.port) == ("127.0.0.1", 9108)


@pytest.mark.parametrize(("port", "hint"), [(70000, "less than or equal to 65535"), ("'x'", "integer")])
def test_a_bad_metrics_port_is_one_line_naming_file_line_and_key(tmp_path: Path, port: object, hint: str) -> None:
    path = tmp_path / "straw.yaml"
    path.write_text(CONFIG.format(port=port))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    [problem] = caught.value.problems
    assert (problem.file, problem.line, problem.key) == (str(path), 3, "metrics.port")
    assert hint in problem.message


def test_the_readme_lists_every_metric_a_scrape_can_show(tmp_path: Path) -> None:
    from straw.metrics import Metrics

    Outbox(tmp_path / "outbox.db").close()
    metrics = Metrics(tmp_path / "outbox.db", ["orders"], ["orders.s"])
    names = {f"{m.name}_total" if m.type == "counter" else m.name for m in metrics.registry.collect()}
    assert "straw_settle_late_rows_total" in names and len(names) > 15
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert sorted(n for n in names if f"| `{n}` |" not in readme) == []
