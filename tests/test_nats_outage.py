"""NATS goes away in the middle of a run and comes back: every row lands exactly once.

tests/test_redis_outage.py on a private `nats-server -js` (file storage): straw
runs continuously while rows keep arriving; the server is killed (SIGKILL) or
stopped (SIGTERM) and stays down for about ten seconds while rows go on arriving
and wait in the outbox (`straw status` says how many and why); then it restarts
on the same port and store, and straw catches up by itself.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import create_engine

from adapters.db import position
from bus.nats import JetStreamOptions, NatsBus
from bus.seam import BusDown
from fixtures.legacy_orders import create_orders
from fixtures.private_nats import NatsServer
from straw.records import event_id
from tests.crashes import SOURCE, assert_exactly_once
from tests.helpers import orders_config
from tests.nats_support import private_nats, read_subject, use_nats
from tests.test_redis_outage import live_outage, straw_status, waiting

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
    url = private_nats.url
    live_outage(config, engine, table, private_nats, outage, lambda: subject_length(url), "nats", down_for=OUTAGE)

    entries = read_subject(url, OPTIONS.stream, SUBJECT)
    expected = {event_id(SOURCE, str(n), position.encode((n,))) for n in range(1, 1451)}
    assert_exactly_once(entries, expected)
    assert [int(e["event"]["subject"]) for e in entries] == list(range(1, 1451))
    after = straw_status(config)
    assert waiting(after) == 0 and "nats unreachable" not in after
