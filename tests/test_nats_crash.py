"""kill -9 at random moments with NATS JetStream as the bus: every source row lands exactly once.

tests/test_crash.py's first test on the machine's nats-server: the real CLI in
continuous mode, 10,000 rows, 24 SIGKILLs (of straw alone or of every straw
process at once), each at a random point of the work left (tests/crashes.py),
then a last `straw run --once`. Between the pipelined publish and the local mark
the relay reconciles from the subject's last message, never by resending.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine

from adapters.db import position
from bus.nats import JetStreamOptions, NatsBus
from fixtures.legacy_orders import create_orders
from straw.records import event_id
from tests.crashes import (
    PACED,
    SOURCE,
    assert_exactly_once,
    assert_kills_landed_mid_work,
    assert_outbox_done,
    crash_loop,
    finish,
)
from tests.helpers import orders_config
from tests.nats_support import jetstream, nats_url, private_nats_for_session, read_subject, subject, use_nats

__all__ = ["jetstream", "nats_url", "private_nats_for_session", "subject"]  # fixtures, imported for pytest
pytestmark = pytest.mark.slow  # deselect with -m 'not slow'


@pytest.fixture
def watcher(nats_url: str, jetstream: JetStreamOptions) -> Iterator[NatsBus]:
    bus = NatsBus(nats_url, options=jetstream, socket_timeout=5)
    yield bus
    bus.close()


def test_kill_9_at_random_moments_loses_and_repeats_nothing_on_nats(
    tmp_path: Path, sqlite_url: str, nats_url: str, jetstream: JetStreamOptions, subject: str, watcher: NatsBus
) -> None:
    rows = 10_000
    engine = create_engine(sqlite_url)
    create_orders(engine, rows)
    engine.dispose()

    def configure(**pacing: object) -> Path:
        written = orders_config(tmp_path, db_url=sqlite_url, redis_url="redis://unused", stream=subject, **pacing)
        return use_nats(written, nats_url, jetstream)

    config = configure(**PACED)
    lengths = crash_loop(config, watcher, subject, kills=24, final=lambda: rows)
    configure(**{**PACED, "max_rows_per_poll": None})
    with (tmp_path / "straw.log").open("ab") as log:
        finish(config, log)

    entries = read_subject(nats_url, jetstream.stream, subject)
    assert_kills_landed_mid_work(lengths, rows)
    expected = {event_id(SOURCE, str(n), position.encode((n,))) for n in range(1, rows + 1)}
    assert_exactly_once(entries, expected)
    assert [e["event"]["subject"] for e in entries] == [str(n) for n in range(1, rows + 1)]
    assert [e["pos"] for e in entries] == [position.encode((n,)) for n in range(1, rows + 1)]
    assert all(e["headers"]["Nats-Msg-Id"] == e["event"]["id"] for e in entries)
    ckpt = watcher.checkpoint(subject)
    assert (ckpt.seq, ckpt.positions) == (entries[-1]["seq"], {"orders": entries[-1]["pos"]})
    assert_outbox_done(tmp_path / "outbox.db", rows)
