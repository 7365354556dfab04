"""RabbitMQ goes away for a minute in the middle of a run and comes back: every row lands exactly once.

`straw run` (continuous) publishes to a private RabbitMQ node while rows keep arriving in the legacy table.
The node is stopped while straw publishes, stays down for 60 s while rows go on arriving and wait in the
outbox (`straw status` says how many, and why), then restarts on the same ports and data; straw catches up
by itself. The machine's shared broker is never touched.

Stopped, not killed: a RabbitMQ 3.10 node killed with SIGKILL a minute after a stream was created came back
with that stream down for good (`rabbitmqctl list_queues` state `down`, no members: the stream coordinator's
registry had not been saved yet), which straw can only report (StreamNotAvailable, records wait) until an
operator repairs the broker. straw's own kills are tests/test_rabbitmq_crash.py.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import create_engine

from adapters.db import position
from bus.rabbitmq import RabbitStreamBus
from bus.seam import BusDown
from fixtures.legacy_orders import create_orders
from fixtures.private_rabbitmq import PrivateRabbit
from straw.records import event_id
from tests.crashes import SOURCE, assert_exactly_once, spawn_straw, tail
from tests.rabbit_helpers import rabbit_config, read_rabbit_stream
from tests.test_redis_outage import add_orders, straw_status, wait_for, waiting

pytestmark = pytest.mark.slow  # deselect with -m 'not slow'
STREAM = "outage.orders"  # the node is this test's alone
DOWN_FOR = 60.0  # seconds, as the issue asks: longer than rstream's heartbeat and the relay's longest backoff


def test_rows_wait_in_the_outbox_while_rabbitmq_is_down_a_minute_and_land_once(
    tmp_path: Path, sqlite_url: str, private_rabbitmq: PrivateRabbit
) -> None:
    engine = create_engine(sqlite_url)
    table = create_orders(engine, 200)
    config = rabbit_config(tmp_path, db_url=sqlite_url, bus_url=private_rabbitmq.url, stream=STREAM,
                           batch_size=50, relay_batch_size=100)
    probe = RabbitStreamBus(private_rabbitmq.url, socket_timeout=3.0)

    def length() -> int:
        try:
            return probe.length(STREAM)
        except BusDown:
            return -1

    logged = tmp_path / "straw.log"
    with logged.open("ab") as log:
        proc = spawn_straw(config, log)
        try:
            wait_for(length_is(length, 200), "the first 200 rows", logged, timeout=120)
            add_orders(engine, table, 201, 100)
            time.sleep(0.2)
            add_orders(engine, table, 301, 1000)
            time.sleep(0.05)  # the stop lands while straw polls and publishes these
            private_rabbitmq.stop()
            down_since = time.monotonic()

            for first in (1301, 1351):
                add_orders(engine, table, first, 50)
                time.sleep(0.2)
            status = ""

            def outbox_holds_them() -> bool:
                nonlocal status
                status = straw_status(config)
                return waiting(status) >= 100 and "rabbitmq unreachable" in status

            wait_for(outbox_holds_them, "`straw status` to show records waiting and why", logged, timeout=60)
            print(status)
            assert length() == -1, "RabbitMQ should still be down"
            time.sleep(max(0.0, DOWN_FOR - (time.monotonic() - down_since)))

            private_rabbitmq.start()  # same ports, same data directory
            add_orders(engine, table, 1401, 50)
            wait_for(length_is(length, 1450), "all 1450 rows in the stream after the restart", logged, timeout=120)
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    engine.dispose()
    assert code == 0, f"straw exited with {code} after SIGTERM:\n{tail(logged)}"

    entries = read_rabbit_stream(probe, STREAM)
    probe.close()
    expected = {event_id(SOURCE, str(n), position.encode((n,))) for n in range(1, 1451)}
    assert_exactly_once(entries, expected)
    assert [int(e["event"]["subject"]) for e in entries] == list(range(1, 1451))
    after = straw_status(config)
    assert waiting(after) == 0 and "rabbitmq unreachable" not in after


def length_is(length: Callable[[], int], wanted: int) -> Callable[[], bool]:
    return lambda: length() == wanted
