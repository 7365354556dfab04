"""Stopping: SIGTERM takes effect at the next batch boundary, exits 0, loses and doubles nothing;
a poll cut at `max_rows_per_poll` is followed by the next one at once."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis

from tests.bigtable import assert_each_row_once, big_table, items_config, run_until_published
from tests.crashes import spawn_straw, straw_command, tail

MILLION = 1_000_000


@pytest.mark.slow  # a million rows through the whole slice: about a minute
def test_sigterm_during_a_million_row_poll_stops_at_a_batch_boundary(
    tmp_path: Path, redis_client: redis.Redis, redis_url: str, stream_name: str
) -> None:
    path = items_config(tmp_path, db_url=big_table(tmp_path / "legacy.db", MILLION), redis_url=redis_url,
                        stream=stream_name, batch_size=5000)
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        proc = spawn_straw(path, out)
        try:
            deadline = time.monotonic() + 120
            while int(redis_client.xlen(stream_name)) < 20_000:  # well into the one big poll
                assert proc.poll() is None, tail(log)
                assert time.monotonic() < deadline, tail(log)
                time.sleep(0.02)
            signalled = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=60)
            took = time.monotonic() - signalled
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert code == 0, tail(log)
    assert took < 5.0, f"stopping took {took:.1f} s:\n{tail(log)}"
    text = log.read_text()
    assert "stopped by SIGTERM" in text and "Traceback" not in text
    assert int(redis_client.xlen(stream_name)) < MILLION  # the poll really was cut short

    again = subprocess.run(straw_command(path, "run", "--once"), capture_output=True, text=True, timeout=600,
                           check=False)
    assert again.returncode == 0, again.stderr
    assert_each_row_once(redis_client, stream_name, MILLION)


def test_a_poll_cut_at_its_cap_polls_again_at_once(
    tmp_path: Path, redis_client: redis.Redis, redis_url: str, stream_name: str
) -> None:
    # poll_interval 1h: without the fix, the second of the five polls would come an hour later.
    path = items_config(tmp_path, db_url=big_table(tmp_path / "legacy.db", 5000), redis_url=redis_url,
                        stream=stream_name, batch_size=500, max_rows_per_poll=1000, poll_interval="1h")
    run_until_published(path, redis_client, stream_name, 5000)
    assert_each_row_once(redis_client, stream_name, 5000)
