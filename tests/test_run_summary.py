"""What a run says it did: per source rows read, events new (upserted / deleted), dead letters;
a continuous run logs `polled` only when something happened; `status` tells listed rows from changes."""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from contextlib import closing
from pathlib import Path

import redis

from tests.bigtable import big_table, items_config
from tests.crashes import spawn_straw, tail
from tests.test_cli import invoke, lines, run_straw


def test_run_once_says_what_each_source_published(tmp_path: Path, redis_url: str, stream_name: str) -> None:
    legacy = tmp_path / "legacy.db"
    path = items_config(tmp_path, db_url=big_table(legacy, 12), redis_url=redis_url, stream=stream_name,
                        mode="snapshot")
    first = run_straw("run", "--once", "--config", str(path))
    assert first.returncode == 0, first.stderr
    assert lines(first.stdout) == [
        "items: 12 rows read, 12 events new (12 upserted, 0 deleted), 0 dead letters",
        "read 12 rows; outbox backlog 0",
    ]
    with closing(sqlite3.connect(legacy)) as db:
        db.execute("DELETE FROM ITEMS WHERE ID IN (3, 4)")
        db.execute("UPDATE ITEMS SET V = 'changed' WHERE ID = 5")
        db.commit()
    second = run_straw("run", "--once", "--config", str(path))
    assert second.returncode == 0, second.stderr
    assert lines(second.stdout)[0] == "items: 10 rows read, 3 events new (1 upserted, 2 deleted), 0 dead letters"

    status = invoke("status", "--config", str(path))
    row = next(r for r in status.stdout.splitlines() if r.startswith("│ items "))
    cells = [c.strip() for c in row.split("│")[1:-1]]
    assert cells[3:5] == ["22 listed", "15"]  # two listings of 12 and 10 rows; 15 changes published


def test_a_continuous_run_logs_polled_only_when_something_happened(
    tmp_path: Path, redis_client: redis.Redis, redis_url: str, stream_name: str
) -> None:
    legacy = tmp_path / "legacy.db"
    path = items_config(tmp_path, db_url=big_table(legacy, 20), redis_url=redis_url, stream=stream_name,
                        mode="snapshot", poll_interval=0.05)
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        proc = spawn_straw(path, out)
        try:
            deadline = time.monotonic() + 60
            while int(redis_client.xlen(stream_name)) < 20:
                assert proc.poll() is None and time.monotonic() < deadline, tail(log)
                time.sleep(0.05)
            time.sleep(1.5)  # some thirty listings that find nothing new
            with closing(sqlite3.connect(legacy)) as db:
                db.execute("DELETE FROM ITEMS WHERE ID = 7")
                db.commit()
            while int(redis_client.xlen(stream_name)) < 21:
                assert proc.poll() is None and time.monotonic() < deadline, tail(log)
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0, tail(log)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    polled = [line for line in log.read_text().splitlines() if "] polled " in line]
    assert len(polled) == 2, polled
    assert "upserted=20" in polled[0] and "deleted=0" in polled[0] and "dead_letters=0" in polled[0]
    assert "upserted=0" in polled[1] and "deleted=1" in polled[1]
