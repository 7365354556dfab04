"""A loader ahead of its bus after a failover (issue 17): the bus restarted from an older snapshot has lost
records the loader applied. The loader says so with both figures, reads nothing while the bus is behind,
and goes on once the publisher's repair has re-published the lost range: every record once, none skipped."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.crashes import REPO, straw_command
from tests.test_bus_rollback import STREAM, add_orders, orders_on_private_redis, rewrite, run_ok, straw

pytestmark = pytest.mark.slow  # a private redis-server and several straw processes


def applied(url: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            found = conn.execute(text("SELECT seq FROM straw_applied WHERE stream = :s"), {"s": STREAM}).first()
        return int(found[0]) if found else 0
    finally:
        engine.dispose()


def orders_in(url: str) -> list[int]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [int(n) for (n,) in conn.execute(text("SELECT order_no FROM orders ORDER BY order_no"))]
    finally:
        engine.dispose()


def wait_for(condition: object, what: str, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_a_loader_ahead_of_a_rolled_back_bus_waits_for_the_repair_then_goes_on(
    tmp_path: Path, sqlite_url: str
) -> None:
    target = f"sqlite:///{tmp_path / 'target.db'}"
    with orders_on_private_redis(tmp_path, sqlite_url, 300, 100) as (server, client, engine, table, config):
        rewrite(config, loaders=[{"name": "wh", "kind": "sql", "url": target, "streams": [STREAM],
                                  "create_tables": True, "tables": {"order": "orders"}, "block": "200ms",
                                  "claim_idle": "1s"}])

        run_ok(config)
        client.save()  # the snapshot the bus comes back from: seq 1..300
        add_orders(engine, table, 301, 300)
        run_ok(config)
        loaded = straw(config, "load", "wh", "--once")  # the loader applies up to seq 600...
        assert loaded.returncode == 0, loaded.stderr
        assert applied(target) == 600
        client.close()
        server.kill()  # ...and the bus restarts from the snapshot, without 301..600
        server.start()
        assert client.xlen(STREAM) == 300  # the bus holds seq 1..300 again

        once = straw(config, "load", "wh", "--once")  # --once does not wait for ever: one line, exit 1
        assert once.returncode == 1
        assert "applied up to seq 600 but the bus's newest record is seq 300" in once.stderr, once.stderr

        log_path = tmp_path / "load.log"
        with log_path.open("wb") as log:
            loader = subprocess.Popen(straw_command(config, "load", "wh"), cwd=REPO, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for(lambda: "the bus is behind this loader" in log_path.read_text(), "no error line")
            said = log_path.read_text()
            assert "applied_seq=600" in said and "bus_newest_seq=300" in said, said
            time.sleep(1.0)  # it polls, reads nothing meanwhile
            assert loader.poll() is None
            groups = client.xinfo_groups(STREAM)
            assert [g["last-delivered-id"] for g in groups] == [b"0-0"]  # not one entry read while behind
            assert applied(target) == 600

            add_orders(engine, table, 601, 50)
            log_of_repair = run_ok(config)  # the relay's repair re-publishes 301..600, then 601..650
            assert "bus rollback repaired" in log_of_repair
            wait_for(lambda: applied(target) == 650, "the loader did not go on after the repair")
            assert orders_in(target) == list(range(1, 651))  # none skipped, none twice (a key is a row)
            assert "the bus caught up with this loader" in log_path.read_text()
        finally:
            loader.send_signal(signal.SIGTERM)
            code = loader.wait(30)
        assert code == 0, log_path.read_text()[-2000:]
