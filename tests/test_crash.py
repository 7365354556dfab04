"""kill -9 at random moments, over and over: every source row still lands in the stream exactly once.

The child is the real CLI in continuous mode (`straw run`), the way it runs in
production, with the poller and the relay at work side by side, so kills land
in start-up, in polls, in relay rounds and between them. The final run is
`straw run --once`, which ends by itself once everything is published, so the
test needs no guess about when the work is done.

How each kill picks its moment and its victim (and how to replay a run with
STRAW_CRASH_SEED) is in tests/crashes.py, which the other crash tests share.
"""

from __future__ import annotations

import datetime as dt
import random
import sqlite3
from collections import defaultdict
from contextlib import closing
from itertools import pairwise
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from sqlalchemy import create_engine, select, update

from adapters.db import position
from bus.redis import read_checkpoint
from fixtures.legacy_orders import STATUSES, create_orders
from outbox.store import Outbox
from straw.records import event_id
from tests.crashes import PACED, SOURCE, assert_exactly_once, assert_kills_landed_mid_work, crash_loop, finish
from tests.helpers import orders_config, read_stream

pytestmark = pytest.mark.slow  # deselect with -m 'not slow'


def test_kill_9_at_random_moments_loses_and_repeats_nothing(
    tmp_path: Path, sqlite_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    rows = 10_000
    engine = create_engine(sqlite_url)
    create_orders(engine, rows)
    engine.dispose()
    config = orders_config(tmp_path, db_url=sqlite_url, redis_url=redis_url, stream=stream_name, **PACED)

    lengths = crash_loop(config, redis_client, stream_name, kills=24, final=lambda: rows)

    uncapped = {**PACED, "max_rows_per_poll": None}
    orders_config(tmp_path, db_url=sqlite_url, redis_url=redis_url, stream=stream_name, **uncapped)
    with (tmp_path / "straw.log").open("ab") as log:
        finish(config, log)

    entries = read_stream(redis_client, stream_name)
    assert_kills_landed_mid_work(lengths, rows)
    expected = {event_id(SOURCE, str(n), position.encode((n,))) for n in range(1, rows + 1)}
    assert_exactly_once(entries, expected)
    # One incrementing source: stream order is source order.
    assert [e["event"]["subject"] for e in entries] == [str(n) for n in range(1, rows + 1)]
    assert [e["pos"] for e in entries] == [position.encode((n,)) for n in range(1, rows + 1)]
    ckpt = read_checkpoint(redis_client, stream_name)
    assert (ckpt.seq, ckpt.positions) == (entries[-1]["seq"], {"orders": entries[-1]["pos"]})
    outbox = Outbox(tmp_path / "outbox.db")
    try:
        (state,) = outbox.sources()
        assert (state.rows_read, state.rows_published, outbox.backlog()) == (rows, rows, 0)
    finally:
        outbox.close()


def outbox_watermark(path: Path) -> tuple[Any, ...] | None:
    """Where the (dead) poller stands: every row version at or before it is in the outbox."""
    if not path.exists():
        return None
    with closing(sqlite3.connect(path)) as db:
        try:
            row = db.execute("SELECT position FROM positions WHERE source = 'orders'").fetchone()
        except sqlite3.OperationalError:
            return None
    return position.decode(row[0], (dt.datetime, int)) if row and row[0] else None


def test_kill_9_while_the_table_keeps_changing_delivers_each_change_once_in_order(
    tmp_path: Path, sqlite_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    engine = create_engine(sqlite_url)
    table = create_orders(engine, 3_000)
    with engine.connect() as conn:
        current = conn.execute(select(table.c.ORDER_NO, table.c.CHANGED_AT)).all()
    # Per key, the versions of the row straw must deliver, in order.
    versions: dict[int, list[tuple[dt.datetime, int]]] = {key: [(ts, key)] for key, ts in current}
    clock = max(ts for _, ts in current)
    paced = {**PACED, "max_rows_per_poll": 50}
    config = orders_config(
        tmp_path, db_url=sqlite_url, redis_url=redis_url, stream=stream_name, mode="timestamp", **paced
    )

    def change_rows(rng: random.Random) -> None:
        """While straw is down, update 40 random rows, each to a timestamp later than any before."""
        nonlocal clock
        watermark = outbox_watermark(tmp_path / "outbox.db")
        with engine.begin() as conn:
            for key in rng.sample(sorted(versions), 40):
                clock += dt.timedelta(seconds=1)
                if watermark is None or versions[key][-1] > watermark:
                    versions[key].pop()  # never read, and now it never will be: only the new version exists
                conn.execute(
                    update(table)
                    .where(key == table.c.ORDER_NO)
                    .values(CHANGED_AT=clock, STATUS=rng.choice(STATUSES), NOTE=f"change at {clock}")
                )
                versions[key].append((clock, key))

    lengths = crash_loop(
        config, redis_client, stream_name, kills=20, between=change_rows,
        final=lambda: sum(len(chain) for chain in versions.values()),
    )
    orders_config(
        tmp_path, db_url=sqlite_url, redis_url=redis_url, stream=stream_name, mode="timestamp",
        **{**paced, "max_rows_per_poll": None},
    )
    with (tmp_path / "straw.log").open("ab") as log:
        finish(config, log)
    engine.dispose()

    entries = read_stream(redis_client, stream_name)
    assert_kills_landed_mid_work(lengths, len(entries))
    expected = {
        event_id(SOURCE, str(key), position.encode(v)) for key, chain in versions.items() for v in chain
    }
    assert len(expected) > len(versions), "no row changed while straw was down: the test proved nothing"
    assert_exactly_once(entries, expected)
    delivered: dict[int, list[str]] = defaultdict(list)
    for entry in entries:
        delivered[int(entry["event"]["subject"])].append(entry["pos"])
    for key, chain in versions.items():
        assert delivered[key] == [position.encode(v) for v in chain], f"changes of order {key} out of order"
    # One source read in (timestamp, key) order: positions only grow along the stream.
    positions = [tuple(orjson.loads(e["pos"])) for e in entries]
    assert all(a < b for a, b in pairwise(positions)), "the stream went back in the source's order"
