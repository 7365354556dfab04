"""kill -9 at random moments with RabbitMQ Streams as the bus: every row still lands exactly once.

The same crash loop as tests/test_crash.py (the real CLI in continuous mode, kills of the main process alone
or of the whole group, moments picked at random points of the work left), on the machine's RabbitMQ.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import create_engine

from adapters.db import position
from bus.rabbitmq import RabbitStreamBus
from fixtures.legacy_orders import create_orders
from outbox.store import Outbox
from straw.records import event_id
from tests.crashes import PACED, SOURCE, assert_exactly_once, assert_kills_landed_mid_work, crash_loop, finish
from tests.rabbit_helpers import rabbit_config, read_rabbit_stream

pytestmark = pytest.mark.slow  # deselect with -m 'not slow'


def test_kill_9_at_random_moments_loses_and_repeats_nothing_on_rabbitmq(
    tmp_path: Path, sqlite_url: str, rabbitmq_url: str, rabbitmq_bus: RabbitStreamBus, rabbitmq_stream: str
) -> None:
    rows, stream, bus = 10_000, rabbitmq_stream, rabbitmq_bus
    engine = create_engine(sqlite_url)
    create_orders(engine, rows)
    engine.dispose()
    config = rabbit_config(tmp_path, db_url=sqlite_url, bus_url=rabbitmq_url, stream=stream, **PACED)

    lengths = crash_loop(config, bus, stream, kills=24, final=lambda: rows)

    rabbit_config(tmp_path, db_url=sqlite_url, bus_url=rabbitmq_url, stream=stream,
                  **{**PACED, "max_rows_per_poll": None})
    with (tmp_path / "straw.log").open("ab") as log:
        finish(config, log)

    entries = read_rabbit_stream(bus, stream)
    assert_kills_landed_mid_work(lengths, rows)
    expected = {event_id(SOURCE, str(n), position.encode((n,))) for n in range(1, rows + 1)}
    assert_exactly_once(entries, expected)
    assert [e["event"]["subject"] for e in entries] == [str(n) for n in range(1, rows + 1)]
    assert [e["pos"] for e in entries] == [position.encode((n,)) for n in range(1, rows + 1)]
    ckpt = bus.checkpoint(stream)
    assert (ckpt.seq, ckpt.positions) == (entries[-1]["seq"], {"orders": entries[-1]["pos"]})
    outbox = Outbox(tmp_path / "outbox.db")
    try:
        (state,) = outbox.sources()
        assert (state.rows_read, state.rows_published, outbox.backlog()) == (rows, rows, 0)
    finally:
        outbox.close()
