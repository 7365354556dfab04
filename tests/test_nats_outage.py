"""NATS goes away in the middle of a run and comes back: every row lands exactly once.

tests/test_redis_outage.py on a private `nats-server -js` (file storage): straw
runs continuously while rows keep arriving; the server is killed (SIGKILL) or
stopped (SIGTERM) and stays down for about ten seconds while rows go on arriving
and wait in the outbox (`straw status` says how many and why); then it restarts
on the same port and store, and straw catches up by itself.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine

from adapters.db import position
from bus.nats import JetStreamOptions, NatsBus
from bus.seam import BusDown
from fixtures.legacy_orders import create_orders
from fixtures.private_nats import NatsServer
from straw.records import event_id
from tests.crashes import SOURCE, assert_exactly_once, spawn_straw, tail
from tests.helpers import orders_config
from tests.nats_support import private_nats, read_subject, use_nats
from tests.test_redis_outage import add_orders, straw_status, wait_for, waiting

__all__ = ["private_nats"]  # a fixture, imported for pytest
pytestmark = pytest.mark.slow  # deselect with -m 'not slow'
SUBJECT = "outage.orders"  # the server is this test's alone
OPTIONS = JetStreamOptions(stream="outage")
OUTAGE = 10.0  # seconds the server stays down, at least


def subject_length(url: str) -> int:
    bus = NatsBus(url, options=OPTIONS, socket_timeout=1)
    try:
        return bus.length(SUBJECT)
    except BusDown:
        return -1
    finally:
        bus.close()


@pytest.mark.parametrize("outage", ["kill", "stop"])
def test_rows_wait_in_the_outbox_while_nats_is_down_and_land_once(
    outage: str, tmp_path: Path, sqlite_url: str, private_nats: NatsServer
) -> None:
    engine = create_engine(sqlite_url)
    table = create_orders(engine, 200)
    config = use_nats(orders_config(tmp_path, db_url=sqlite_url, redis_url="redis://unused", stream=SUBJECT,
                                    batch_size=50, relay_batch_size=100), private_nats.url, OPTIONS)
    url, logged = private_nats.url, tmp_path / "straw.log"
    with logged.open("ab") as log:
        proc = spawn_straw(config, log)
        try:
            wait_for(lambda: subject_length(url) == 200, "the first 200 rows", logged)
            add_orders(engine, table, 201, 100)
            time.sleep(0.2)  # rows keep arriving while straw polls
            add_orders(engine, table, 301, 1000)
            time.sleep(0.05)  # the outage lands while straw polls and publishes these
            private_nats.kill() if outage == "kill" else private_nats.stop()
            down_at = time.monotonic()

            for first in (1301, 1351):
                add_orders(engine, table, first, 50)
                time.sleep(0.2)
            status = ""

            def outbox_holds_them() -> bool:
                nonlocal status
                status = straw_status(config)
                return waiting(status) >= 100 and "nats unreachable" in status

            wait_for(outbox_holds_them, "`straw status` to show records waiting and why", logged, timeout=30)
            print(status)
            assert subject_length(url) == -1, "NATS should still be down"
            time.sleep(max(0.0, OUTAGE - (time.monotonic() - down_at)))

            private_nats.start()  # same port, same store
            add_orders(engine, table, 1401, 50)
            wait_for(lambda: subject_length(url) == 1450, "all 1450 rows on the subject after the restart", logged)
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    engine.dispose()
    assert code == 0, f"straw exited with {code} after SIGTERM:\n{tail(logged)}"

    entries = read_subject(url, OPTIONS.stream, SUBJECT)
    expected = {event_id(SOURCE, str(n), position.encode((n,))) for n in range(1, 1451)}
    assert_exactly_once(entries, expected)
    assert [int(e["event"]["subject"]) for e in entries] == list(range(1, 1451))
    after = straw_status(config)
    assert waiting(after) == 0 and "nats unreachable" not in after
