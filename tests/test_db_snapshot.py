"""Snapshot diff on real databases: tables with no change column, compared key by key with the last listing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import redis
from sqlalchemy import create_engine, delete, insert, update

from bus.redis import RedisBus
from fixtures.legacy_orders import create_orders, order_rows
from outbox import keyed
from outbox.relay import adopt_streams
from outbox.store import Outbox
from straw.config_load import load_config
from straw.runner import build_pipeline, poll
from tests.helpers import orders_config, read_stream, run_once


def snapshot_config(tmp_path: Path, db_url: str, redis_url: str, stream: str, **source: Any) -> Path:
    return orders_config(
        tmp_path, db_url=db_url, redis_url=redis_url, stream=stream, mode="snapshot",
        timestamp_column=None, key_column=None, **source,
    )


def listing(outbox: Outbox) -> list[int]:
    """The snapshot position: [listing, last key] while listing, [listing] once complete."""
    return list(orjson.loads(outbox.position("orders") or "null"))


def changes(client: redis.Redis, stream: str, start: int = 0) -> list[tuple[str, str]]:
    return [(e["event"]["type"], e["event"]["subject"]) for e in read_stream(client, stream)[start:]]


def test_snapshot_emits_new_changed_and_vanished_keys_only(
    tmp_path: Path, db_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    engine = create_engine(db_url)
    table = create_orders(engine, 20)
    path = snapshot_config(tmp_path, db_url, redis_url, stream_name, batch_size=6)

    assert run_once(path).errors == []
    assert changes(redis_client, stream_name) == [("order.upserted", str(n)) for n in range(1, 21)]
    assert run_once(path).errors == []
    assert len(read_stream(redis_client, stream_name)) == 20  # an unchanged table sends nothing

    with engine.begin() as conn:
        conn.execute(update(table).where(table.c.ORDER_NO == 5).values(STATUS="SHIPPED"))
        conn.execute(delete(table).where(table.c.ORDER_NO.in_([7, 20])))
        conn.execute(insert(table), order_rows(1, first=21))
    assert run_once(path).errors == []
    entries = read_stream(redis_client, stream_name)[20:]
    # upserts in key order, then the keys that vanished (in the order they were first listed)
    assert [(e["event"]["type"], e["event"]["subject"]) for e in entries] == [
        ("order.upserted", "5"), ("order.upserted", "21"), ("order.deleted", "7"), ("order.deleted", "20"),
    ]
    assert entries[0]["event"]["data"]["status"] == "SHIPPED"
    assert entries[2]["event"]["data"] == {"order_no": 7}  # a deleted event carries the key fields

    # Back to the earlier value is a change too, with an id of its own.
    first_five = read_stream(redis_client, stream_name)[4]["event"]
    with engine.begin() as conn:
        conn.execute(update(table).where(table.c.ORDER_NO == 5).values(STATUS=first_five["data"]["status"]))
    assert run_once(path).errors == []
    last = read_stream(redis_client, stream_name)[24:]
    assert [(e["event"]["type"], e["event"]["subject"]) for e in last] == [("order.upserted", "5")]
    assert last[0]["event"]["data"] == first_five["data"] and last[0]["event"]["id"] != first_five["id"]
    engine.dispose()


def test_snapshot_of_an_emptied_table_deletes_every_key(
    tmp_path: Path, sqlite_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    engine = create_engine(sqlite_url)
    table = create_orders(engine, 5)
    path = snapshot_config(tmp_path, sqlite_url, redis_url, stream_name)
    assert run_once(path).errors == []
    with engine.begin() as conn:
        conn.execute(delete(table))
    assert run_once(path).errors == []
    assert changes(redis_client, stream_name, 5) == [("order.deleted", str(n)) for n in range(1, 6)]
    engine.dispose()


def test_interrupted_listing_resumes_or_restarts_without_loss_or_repeat(
    tmp_path: Path, db_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    engine = create_engine(db_url)
    table = create_orders(engine, 10)
    # each poll reads at most 4 rows: a listing takes three polls, as if cut short twice
    path = snapshot_config(tmp_path, db_url, redis_url, stream_name, batch_size=3, max_rows_per_poll=4)
    config = load_config(path)
    pipeline = build_pipeline(config, config.sources[0])
    outbox = Outbox(config.outbox.path)
    try:
        adopt_streams(RedisBus(redis_client), outbox, [stream_name])
        assert [poll(pipeline, outbox) for _ in range(3)] == [4, 4, 2]
        first = listing(outbox)
        assert first[1:] == []  # listing `first` is complete
        assert keyed.known_keys(outbox.db, "orders") == 10

        assert poll(pipeline, outbox) == 4  # the next listing reads keys 1-4, then "crashes"
        second = listing(outbox)
        assert second[0] > first[0] and second[1:] == [4]
        with engine.begin() as conn:
            conn.execute(delete(table).where(table.c.ORDER_NO.in_([2, 9])))  # one read already, one not
            conn.execute(update(table).where(table.c.ORDER_NO == 8).values(STATUS="X"))
        assert [poll(pipeline, outbox) for _ in range(2)] == [4, 1]  # resumes after key 4: 5, 6, 7, 8, 10
        assert listing(outbox) == second[:1]

        # A source that cannot resume starts over: rows it already sent are not sent again.
        assert poll(pipeline, outbox) == 4
        with outbox.db:
            outbox.db.execute("UPDATE positions SET position = NULL WHERE source = 'orders'")
        assert [poll(pipeline, outbox) for _ in range(3)] == [4, 4, 0]  # the listing ended at the limit
        assert listing(outbox)[1:] == []
    finally:
        outbox.close()
        pipeline.source.close()
    assert run_once(path).errors == []
    assert changes(redis_client, stream_name, 10) == [
        ("order.upserted", "8"), ("order.deleted", "9"), ("order.deleted", "2"),
    ]
    engine.dispose()


def test_soft_deleted_row_is_deleted_once_in_snapshot_mode(
    tmp_path: Path, sqlite_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    engine = create_engine(sqlite_url)
    table = create_orders(engine, 4)
    path = snapshot_config(
        tmp_path, sqlite_url, redis_url, stream_name, soft_delete={"column": "STATUS", "value": "CANCELLED"}
    )
    with engine.begin() as conn:
        conn.execute(update(table).values(STATUS="NEW"))
    assert run_once(path).errors == []
    with engine.begin() as conn:
        conn.execute(update(table).where(table.c.ORDER_NO == 3).values(STATUS="CANCELLED"))
    assert run_once(path).errors == []
    assert run_once(path).errors == []
    assert changes(redis_client, stream_name, 4) == [("order.deleted", "3")]
    engine.dispose()


def test_the_digest_and_stale_key_lookups_by_id_use_the_id_index(tmp_path: Path) -> None:
    """`by_digest`'s run and the sweep's stale keys by id: one covering index, no sort (a million-key listing
    lives on these plans, as on those of tests/test_keyed_outbox.py)."""
    outbox = Outbox(tmp_path / "o.db")
    try:
        db = outbox.db  # no ANALYZE: the outbox never runs one
        plan = " / ".join(row[-1] for row in db.execute(f"EXPLAIN QUERY PLAN {keyed.DIGEST_IDS}", ("s", 1, 9)))
        assert "COVERING INDEX keyed_state_ids (source=? AND id>? AND id<?)" in plan
        plan = " / ".join(row[-1] for row in db.execute(
            f"EXPLAIN QUERY PLAN {keyed.STALE_LOOKUP.format(marks='?,?,?')}", ("s", 9, 3, 5)))
        assert "COVERING INDEX keyed_state_ids (source=? AND id=?)" in plan and "TEMP B-TREE" not in plan
    finally:
        outbox.close()


def test_a_sweep_finds_few_stale_keys_by_id_and_many_by_a_scan(tmp_path: Path) -> None:
    """Both ways of finding the keys a listing did not see (4 of 100: by id; 50 and 90: a scan) give them all,
    once, in listing order, and forget them."""
    from tests.test_keyed_outbox import batch, commit, mapper

    for name, kept in (("few", [i for i in range(100) if i % 25 != 3]), ("half", list(range(0, 100, 2))),
                       ("most", list(range(1, 100, 10)))):
        outbox, m = Outbox(tmp_path / f"{name}.db"), mapper()
        try:
            commit(outbox, m, batch([(f"k{i}", 1, "1.00") for i in range(100)], 1, complete=True))
            events = commit(outbox, m, batch([(f"k{i}", 1, "1.00") for i in kept], 2, complete=True))
            assert [e["subject"] for e in events] == [f"k{i}/1" for i in range(100) if i not in kept]
            assert {e["type"] for e in events} == {"item.deleted"}
            assert keyed.known_keys(outbox.db, "shop") == len(kept)
        finally:
            outbox.close()
