"""The `straw` command as an operator meets it: check, preview, status, run --once, STRAW_CONFIG.

Commands that only read run in-process through typer's CliRunner; `run` runs as a
real subprocess, because it starts threads and configures logging for the process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import redis
import structlog
from sqlalchemy import MetaData, create_engine, insert
from typer.testing import CliRunner, Result

from fixtures.legacy_orders import create_orders, order_rows, orders_table
from straw.cli import app
from straw.local_redis import RedisServer, free_port
from tests.helpers import orders_config, read_stream

_RUNNER = CliRunner()


def invoke(*args: str, env: dict[str, str | None] | None = None) -> Result:
    """`straw ARGS` in-process: wide enough that no line wraps; structlog left as it was found."""
    saved = structlog.get_config()
    try:
        return _RUNNER.invoke(app, list(args), env={"COLUMNS": "400", "STRAW_CONFIG": None, **(env or {})})
    finally:
        structlog.configure(**saved)  # the command pointed structlog at the runner's (now closed) stderr


def run_straw(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`straw ARGS` as its own process, as systemd or cron would start it."""
    full = {k: v for k, v in os.environ.items() if k != "STRAW_CONFIG"}
    full.update({"COLUMNS": "400", **(env or {})})
    return subprocess.run(
        [sys.executable, "-m", "straw.cli", *args],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, env=full, timeout=120, check=False,
    )


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _legacy(tmp_path: Path, rows: int = 20) -> str:
    url = f"sqlite:///{tmp_path / 'legacy.db'}"
    engine = create_engine(url)
    create_orders(engine, rows)
    engine.dispose()
    return url


def test_check_all_fine_prints_one_ok_line_per_item(
    tmp_path: Path, redis_url: str, stream_name: str
) -> None:
    path = orders_config(tmp_path, db_url=_legacy(tmp_path), redis_url=redis_url, stream=stream_name)
    result = invoke("check", "--config", str(path))
    assert result.exit_code == 0, result.output
    shown = lines(result.stdout)
    assert [line.split(":")[0] for line in shown] == ["ok   config", "ok   source orders", "ok   outbox", "ok   redis"]
    assert "table ORDERS" in shown[1] and "mode incrementing" in shown[1]


def test_check_fails_when_redis_is_unreachable(tmp_path: Path, stream_name: str) -> None:
    closed = f"redis://127.0.0.1:{free_port()}/0"
    path = orders_config(tmp_path, db_url=_legacy(tmp_path), redis_url=closed, stream=stream_name)
    result = invoke("check", "--config", str(path))
    assert result.exit_code == 1
    redis_line = lines(result.stdout)[-1]
    assert redis_line.startswith("FAIL redis: unreachable") and "Connection refused" in redis_line
    assert "ok   source orders" in result.stdout  # the other items are still checked


def test_check_fails_on_a_missing_table(tmp_path: Path, redis_url: str, stream_name: str) -> None:
    path = orders_config(
        tmp_path, db_url=_legacy(tmp_path), redis_url=redis_url, stream=stream_name, table="ORDERS_2019"
    )
    result = invoke("check", "--config", str(path))
    assert result.exit_code == 1
    failed = [line for line in lines(result.stdout) if line.startswith("FAIL")]
    assert failed == [
        "FAIL source orders: SchemaDrift: source 'orders': table 'ORDERS_2019' not found; check `table` (and `schema`)"
    ]


def test_preview_shows_records_and_writes_nothing(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    path = orders_config(tmp_path, db_url=_legacy(tmp_path), redis_url=redis_url, stream=stream_name)
    result = invoke("preview", "orders", "--config", str(path), "--limit", "5")
    assert result.exit_code == 0, result.output
    assert "orders -> order (first 5 rows)" in result.stdout
    subjects = [row.split("│")[1].strip() for row in result.stdout.splitlines() if row.startswith("│")]
    assert subjects == ["1", "2", "3", "4", "5"]
    assert not (tmp_path / "outbox.db").exists()
    assert redis_client.exists(stream_name) == 0

    unknown = invoke("preview", "order", "--config", str(path))
    assert unknown.exit_code == 2
    assert "no source named 'order'; sources: orders" in unknown.stderr


def test_status_after_a_run_shows_position_and_counts(tmp_path: Path, redis_url: str, stream_name: str) -> None:
    path = orders_config(tmp_path, db_url=_legacy(tmp_path, 12), redis_url=redis_url, stream=stream_name)
    ran = run_straw("run", "--once", "--config", str(path))
    assert ran.returncode == 0, ran.stderr
    assert "read 12 rows; outbox backlog 0" in ran.stdout

    result = invoke("status", "--config", str(path))
    assert result.exit_code == 0, result.output
    source_row = next(row for row in result.stdout.splitlines() if row.startswith("│ orders "))
    cells = [cell.strip() for cell in source_row.split("│")[1:-1]]
    assert cells[1:2] == ["[12]"] and cells[3:6] == ["12", "12", "0"]
    stream_row = next(row for row in result.stdout.splitlines() if row.startswith(f"│ {stream_name} "))
    assert [cell.strip() for cell in stream_row.split("│")[1:-1]][1] == "12"  # stream length
    assert "0 records waiting" in result.stdout


def test_run_with_redis_down_keeps_records_and_status_shows_them(
    tmp_path: Path, private_redis: RedisServer, stream_name: str
) -> None:
    legacy = _legacy(tmp_path, 5)
    path = orders_config(tmp_path, db_url=legacy, redis_url=private_redis.url, stream=stream_name)
    assert run_straw("run", "--once", "--config", str(path)).returncode == 0  # adopts the stream, publishes 5
    private_redis.stop()
    engine = create_engine(legacy)
    with engine.begin() as conn:
        conn.execute(insert(orders_table(MetaData())), order_rows(7, first=6))
    engine.dispose()

    ran = run_straw("run", "--once", "--wait", "1", "--config", str(path))
    assert ran.returncode == 1
    assert "read 7 rows; outbox backlog 7" in ran.stdout
    assert "7 records wait in the outbox (Redis unreachable?)" in ran.stderr

    result = invoke("status", "--config", str(path))
    assert result.exit_code == 0, result.output
    assert "outbox" in result.stdout and "7 records waiting" in result.stdout
    stream_row = next(row for row in result.stdout.splitlines() if row.startswith(f"│ {stream_name} "))
    cells = [cell.strip() for cell in stream_row.split("│")[1:-1]]
    assert cells[1] == "?" and cells[4] == "7"  # length unknown, 7 waiting
    assert "Connection refused" in cells[6] or "Error 111" in cells[6]

    private_redis.start()
    assert run_straw("run", "--once", "--config", str(path)).returncode == 0
    client = redis.Redis.from_url(private_redis.url)
    assert [e["event"]["subject"] for e in read_stream(client, stream_name)] == [str(n) for n in range(1, 13)]
    client.close()


def test_a_new_outbox_with_redis_down_polls_nothing_and_says_why(tmp_path: Path, stream_name: str) -> None:
    closed = f"redis://127.0.0.1:{free_port()}/0"
    path = orders_config(tmp_path, db_url=_legacy(tmp_path, 3), redis_url=closed, stream=stream_name)
    ran = run_straw("run", "--once", "--wait", "1", "--config", str(path))
    assert ran.returncode == 1
    assert f"stream '{stream_name}' not adopted: Redis unreachable" in ran.stderr
    assert "Traceback" not in ran.stderr


def test_straw_config_env_var_replaces_the_option(tmp_path: Path, redis_url: str, stream_name: str) -> None:
    path = orders_config(tmp_path, db_url=_legacy(tmp_path), redis_url=redis_url, stream=stream_name)
    result = invoke("check", env={"STRAW_CONFIG": str(path)})
    assert result.exit_code == 0, result.output
    assert f"ok   outbox: {tmp_path / 'outbox.db'}" in result.stdout


def test_run_without_a_config_says_so(tmp_path: Path) -> None:
    none_given = invoke("run", "--once")
    assert none_given.exit_code == 2
    assert "no configuration given: pass --config PATH or set STRAW_CONFIG" in none_given.stderr

    missing = tmp_path / "straw.yaml"
    not_found = invoke("run", "--once", "--config", str(missing))
    assert not_found.exit_code == 2
    assert lines(not_found.stderr) == [
        "configuration error",
        f"  {missing}: configuration file not found ({missing}); pass --config PATH or set STRAW_CONFIG",
    ]
