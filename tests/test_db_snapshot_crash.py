"""kill -9 during snapshot listings, with the table changing between kills: still each change once.

A snapshot source's events depend on which versions its listings happened to see,
so the test checks what must hold whatever the timing: no event twice, per key no
two consecutive events that say the same thing (a repeat would mean state lost in a
crash), and the stream ends in the table's final state, deletions included.
"""

from __future__ import annotations

import random
from decimal import Decimal
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, delete, insert, select, update

from fixtures.legacy_orders import create_orders, order_rows
from tests.crashes import PACED, assert_ends_in, crash_loop, finish
from tests.helpers import orders_config, read_stream

pytestmark = pytest.mark.slow


def test_kill_9_during_snapshot_listings_keeps_each_change_once(
    tmp_path: Path, sqlite_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    engine = create_engine(sqlite_url)
    table = create_orders(engine, 3_000)
    snapshot = {"mode": "snapshot", "timestamp_column": None, "key_column": None}
    config = orders_config(tmp_path, db_url=sqlite_url, redis_url=redis_url, stream=stream_name, **PACED, **snapshot)
    next_key = 3_001

    def change_the_table(rng: random.Random) -> None:
        nonlocal next_key
        with engine.begin() as conn:
            keys = list(conn.execute(select(table.c.ORDER_NO)).scalars())
            for key in rng.sample(keys, 20):
                amount = Decimal(rng.randint(1, 10**6)) / 100
                conn.execute(update(table).values(AMOUNT=amount).where(table.c.ORDER_NO.in_([key])))
            conn.execute(delete(table).where(table.c.ORDER_NO.in_(rng.sample(keys, 10))))
            conn.execute(insert(table), order_rows(5, first=next_key))
            next_key += 5

    crash_loop(config, redis_client, stream_name, kills=10, between=change_the_table)
    orders_config(tmp_path, db_url=sqlite_url, redis_url=redis_url, stream=stream_name,
                  **{**PACED, "max_rows_per_poll": None}, **snapshot)
    with (tmp_path / "straw.log").open("ab") as log:
        finish(config, log)  # completes the listing a kill interrupted: it saw some keys before they changed
        finish(config, log)  # a whole listing of the final table

    entries = read_stream(redis_client, stream_name)
    with engine.connect() as conn:
        final = {str(r.ORDER_NO): f"{r.AMOUNT:.2f}" for r in conn.execute(select(table.c.ORDER_NO, table.c.AMOUNT))}
    assert_ends_in(entries, final)
    engine.dispose()
