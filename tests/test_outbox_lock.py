"""One process per outbox: a second `straw run` is refused at once, naming the holder; readers go on."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import redis

from outbox.lock import lock_path
from tests.bigtable import assert_each_row_once, big_table, items_config
from tests.crashes import kill_hard, spawn_straw, straw_command, tail
from tests.test_cli import invoke

ROWS = 100_000


def _wait_for(client: redis.Redis, stream: str, length: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 120
    while int(client.xlen(stream)) < length:
        assert proc.poll() is None, f"straw exited (code {proc.returncode}):\n{tail(log)}"
        assert time.monotonic() < deadline, f"the stream never reached {length} entries:\n{tail(log)}"
        time.sleep(0.05)


def test_two_runs_on_one_outbox_publish_each_row_once(
    tmp_path: Path, redis_client: redis.Redis, redis_url: str, stream_name: str
) -> None:
    path = items_config(tmp_path, db_url=big_table(tmp_path / "legacy.db", ROWS), redis_url=redis_url,
                        stream=stream_name)
    with (tmp_path / "a.log").open("wb") as log_a, (tmp_path / "b.log").open("wb") as log_b:
        first = spawn_straw(path, log_a, "--once")
        second = spawn_straw(path, log_b, "--once")
        codes = {first.pid: first.wait(timeout=300), second.pid: second.wait(timeout=300)}
    logs = {first.pid: (tmp_path / "a.log").read_text(), second.pid: (tmp_path / "b.log").read_text()}
    assert sorted(codes.values()) == [0, 1], logs
    loser = next(pid for pid, code in codes.items() if code == 1)
    winner = next(pid for pid, code in codes.items() if code == 0)
    refused = [line for line in logs[loser].splitlines() if line.strip()]
    assert refused == [
        f"error outbox {tmp_path / 'outbox.db'} is in use by another straw process (PID {winner}); one process "
        "per outbox: stop it first, or use `run --once --wait-lock 60s` to wait for it"
    ]
    assert_each_row_once(redis_client, stream_name, ROWS)


def test_readers_work_while_a_run_holds_the_outbox_and_wait_lock_waits(
    tmp_path: Path, redis_client: redis.Redis, redis_url: str, stream_name: str
) -> None:
    legacy = big_table(tmp_path / "legacy.db", 1000)
    path = items_config(tmp_path, db_url=legacy, redis_url=redis_url, stream=stream_name)
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        service = spawn_straw(path, out)
        try:
            _wait_for(redis_client, stream_name, 1000, service, log)
            assert lock_path(tmp_path / "outbox.db").read_text().strip() == str(service.pid)

            for command in (("status",), ("dead-letters",), ("stream",)):
                result = invoke(*command, "--config", str(path))
                assert result.exit_code == 0, (command, result.output)
            assert "1000 listed" not in invoke("status", "--config", str(path)).stdout  # not a snapshot source

            cron = subprocess.run(straw_command(path, "run", "--once"), capture_output=True, text=True, timeout=60,
                                  check=False)
            assert cron.returncode == 1
            assert f"is in use by another straw process (PID {service.pid})" in cron.stderr
            assert "Traceback" not in cron.stderr

            with (tmp_path / "wait.log").open("wb") as wait_out:
                waiter = spawn_straw(path, wait_out, "--once", "--wait-lock", "60s")
                time.sleep(1.0)
                assert waiter.poll() is None, tail(tmp_path / "wait.log")  # it waits for the lock
                service.send_signal(signal.SIGTERM)
                assert service.wait(timeout=30) == 0, tail(log)
                assert waiter.wait(timeout=60) == 0, tail(tmp_path / "wait.log")
            assert "read 0 rows; outbox backlog 0" in (tmp_path / "wait.log").read_text()
        finally:
            for proc in (service,):
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
    assert_each_row_once(redis_client, stream_name, 1000)


def test_a_killed_holder_leaves_no_stale_lock(
    tmp_path: Path, redis_client: redis.Redis, redis_url: str, stream_name: str
) -> None:
    path = items_config(tmp_path, db_url=big_table(tmp_path / "legacy.db", 500), redis_url=redis_url,
                        stream=stream_name)
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        service = spawn_straw(path, out)
        _wait_for(redis_client, stream_name, 500, service, log)
        kill_hard(service, whole_group=False)
    again = subprocess.run(straw_command(path, "run", "--once"), capture_output=True, text=True, timeout=60,
                           check=False)
    assert again.returncode == 0, again.stderr
    assert_each_row_once(redis_client, stream_name, 500)
