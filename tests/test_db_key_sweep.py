"""Key sweep (`deletes: {sweep_interval}`): hard deletes seen in `timestamp` and `incrementing` mode."""

from __future__ import annotations

import datetime as dt
import random
import sqlite3
import subprocess
from contextlib import closing, suppress
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
import yaml
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, delete, insert, select, update

from adapters.db.keys import list_keys
from fixtures.legacy_orders import create_orders, order_rows
from outbox import sweep
from outbox.store import Outbox
from straw.config_load import load_config
from straw.records import encode_event, event_id, source_uri
from straw.runner import build_pipeline
from tests.crashes import PACED, assert_ends_in, assert_kills_landed_mid_work, crash_loop, finish, straw_command
from tests.helpers import orders_config, read_stream, run_once

SOURCE = source_uri("test", "orders")


def changes(client: redis.Redis, stream: str, start: int = 0) -> list[tuple[str, str]]:
    return [(e["event"]["type"], e["event"]["subject"]) for e in read_stream(client, stream)[start:]]


@pytest.mark.parametrize("mode", ["timestamp", "incrementing"])
def test_sweep_deletes_vanished_keys_once_and_a_reinserted_key_is_upserted_again(
    tmp_path: Path, db_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str, mode: str
) -> None:
    engine = create_engine(db_url)
    table = create_orders(engine, 20)
    path = orders_config(tmp_path, db_url=db_url, redis_url=redis_url, stream=stream_name, mode=mode,
                         batch_size=6, deletes={"sweep_interval": 0})
    assert run_once(path).errors == []
    assert changes(redis_client, stream_name) == [("order.upserted", str(n)) for n in range(1, 21)]

    with engine.begin() as conn:
        conn.execute(delete(table).where(table.c.ORDER_NO.in_([7, 20])))
    assert run_once(path).errors == []
    entries = read_stream(redis_client, stream_name)[20:]
    assert [(e["event"]["type"], e["event"]["subject"]) for e in entries] == [
        ("order.deleted", "7"), ("order.deleted", "20"),
    ]
    assert entries[0]["event"]["data"] == {"order_no": 7}  # the key fields, as the upsert carried them
    first_delete = entries[0]["event"]["id"]
    # The record keeps the source's watermark: the checkpoint takes the source's position from it.
    assert entries[0]["pos"] == read_stream(redis_client, stream_name)[19]["pos"]

    assert run_once(path).errors == []
    assert len(read_stream(redis_client, stream_name)) == 22  # a forgotten key is not deleted twice

    later = dt.datetime(2027, 1, 1, 12, 0)
    with engine.begin() as conn:  # 7 comes back (new time, and a new id for incrementing mode's sake)
        conn.execute(insert(table), [{**order_rows(1, first=7)[0], "ORDER_NO": 7 if mode == "timestamp" else 21,
                                      "CHANGED_AT": later}])
    back = 7 if mode == "timestamp" else 21
    assert run_once(path).errors == []
    assert changes(redis_client, stream_name, 22) == [("order.upserted", str(back))]
    with engine.begin() as conn:
        conn.execute(delete(table).where(table.c.ORDER_NO.in_([back])))
    assert run_once(path).errors == []
    last = read_stream(redis_client, stream_name)[23:]
    assert [(e["event"]["type"], e["event"]["subject"]) for e in last] == [("order.deleted", str(back))]
    assert last[0]["event"]["id"] != first_delete
    ids = [e["event"]["id"] for e in read_stream(redis_client, stream_name)]
    assert len(ids) == len(set(ids))
    engine.dispose()


def test_sweep_runs_at_most_once_per_interval_and_check_mentions_it(
    tmp_path: Path, sqlite_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    engine = create_engine(sqlite_url)
    table = create_orders(engine, 10)
    path = orders_config(tmp_path, db_url=sqlite_url, redis_url=redis_url, stream=stream_name,
                         mode="timestamp", deletes={"sweep_interval": "1h"})
    assert run_once(path).errors == []  # delivers; nothing delivered before: no sweep yet
    assert run_once(path).errors == []  # the first sweep: finds every key
    with engine.begin() as conn:
        conn.execute(delete(table).where(table.c.ORDER_NO == 3))
    assert run_once(path).errors == []
    assert len(read_stream(redis_client, stream_name)) == 10  # not due for an hour
    outbox = Outbox(tmp_path / "outbox.db")
    try:  # an hour later
        outbox.db.execute("UPDATE sweep_sources SET started = started - 3601")
    finally:
        outbox.close()
    assert run_once(path).errors == []
    assert changes(redis_client, stream_name, 10) == [("order.deleted", "3")]

    done = subprocess.run(straw_command(path, "check"), capture_output=True, text=True, check=False)
    assert "key sweep for hard deletes every 3600s on ORDER_NO" in done.stdout, done.stdout + done.stderr
    engine.dispose()


def test_deletes_is_refused_for_snapshot_mode(tmp_path: Path, sqlite_url: str, redis_url: str) -> None:
    path = orders_config(tmp_path, db_url=sqlite_url, redis_url=redis_url, stream="s", mode="snapshot",
                         timestamp_column=None, key_column=None, deletes={"sweep_interval": "1h"})
    done = subprocess.run(straw_command(path, "check"), capture_output=True, text=True, check=False)
    assert done.returncode != 0
    assert "straw.yaml:" in done.stderr + done.stdout and "snapshot" in done.stderr + done.stdout
    assert "Traceback" not in done.stderr


# --- the state in the outbox, on its own -----------------------------------------------


def _event(op: str, key: int, position: str) -> bytes:
    data: dict[str, Any] = {"order_no": key} if op == "deleted" else {"order_no": key, "status": "NEW"}
    return encode_event(source=SOURCE, entity="order", op=op, key=str(key), position=position,
                        time="2026-11-29T00:00:00Z", data=data)


def _encode(op: str, key: str, position: str, data: dict[str, Any]) -> bytes:
    return encode_event(source=SOURCE, entity="order", op=op, key=key, position=position,
                        time="2026-11-29T00:00:00Z", data=data)


def _deliver(outbox: Outbox, *keys: int, op: str = "upserted") -> None:
    outbox.append("orders", "s", [(f"[{k}]", _event(op, k, f"[{k}]")) for k in keys], [], f"[{max(keys)}]", len(keys))


def _swept(outbox: Outbox) -> list[dict[str, Any]]:
    events = [{"pos": r.position, **orjson.loads(r.event)} for r in outbox.events()]
    return [e for e in events if e["type"] == "order.deleted"]


def test_only_keys_delivered_before_the_sweep_started_are_swept(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.db")
    outbox.track_keys("orders", ["order_no"])
    _deliver(outbox, 1, 2, 3)
    state = outbox.sweep_begin("orders", 0, 1000.0)
    assert state is not None
    # Delivered after the sweep started (its listing may not have seen the row yet): not compared.
    _deliver(outbox, 4)
    outbox.sweep_mark("orders", ["1"], '[1]')
    assert outbox.sweep_finish("orders", "s", _encode) == 2  # 2 and 3: delivered before, not listed
    swept = _swept(outbox)
    assert [e["subject"] for e in swept] == ["2", "3"]
    assert swept[0]["id"] == event_id(SOURCE, "2", state.position)
    assert {e["pos"] for e in swept} == {"[4]"}  # the source's position, not the sweep's
    # 4 is compared by the next sweep; a key deleted by an event is forgotten, not swept again.
    _deliver(outbox, 1, op="deleted")
    again = outbox.sweep_begin("orders", 0, 1000.0)
    assert again is not None and again.number > state.number
    assert outbox.sweep_finish("orders", "s", _encode) == 1
    assert [e["subject"] for e in _swept(outbox)] == ["2", "3", "1", "4"]  # 1: the delivered delete
    # Nothing delivered to sweep: no sweep at all.
    assert outbox.sweep_begin("orders", 0, 1001.0) is None
    outbox.close()


def test_a_sweep_re_run_after_a_crash_gives_the_same_event_ids(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.db")
    outbox.track_keys("orders", ["order_no"])
    _deliver(outbox, *range(1, 2001))
    assert outbox.sweep_begin("orders", 0, 1000.0) is not None
    outbox.sweep_mark("orders", [str(k) for k in range(1, 1001) if k % 7], "[1000]")
    outbox.close()  # a kill after a committed batch: the sweep resumes where it stood

    outbox = Outbox(tmp_path / "outbox.db")
    outbox.track_keys("orders", ["order_no"])
    resumed = outbox.sweep_begin("orders", 0, 5000.0)
    assert resumed is not None and resumed.after == "[1000]"
    outbox.sweep_mark("orders", [str(k) for k in range(1001, 2001) if k % 7], "[2000]")

    def once() -> list[bytes]:
        outbox.db.execute("BEGIN IMMEDIATE")
        try:
            return list(sweep.finish(outbox.db, "orders", _encode))
        finally:
            outbox.db.execute("ROLLBACK")  # a kill before the commit

    first, second = once(), once()
    assert first == second and len(first) == 2000 // 7
    assert outbox.sweep_finish("orders", "s", _encode) == 2000 // 7
    assert [e["id"] for e in _swept(outbox)] == [orjson.loads(e)["id"] for e in first]
    outbox.close()


def test_sweep_listing_resumes_after_the_last_committed_batch(
    tmp_path: Path, db_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    engine = create_engine(db_url)
    table = create_orders(engine, 25)
    path = orders_config(tmp_path, db_url=db_url, redis_url=redis_url, stream=stream_name,
                         deletes={"sweep_interval": 0})
    config = load_config(path)
    pipeline = build_pipeline(config, config.sources[0])
    source = pipeline.source
    assert hasattr(source, "relation")
    batches = list(list_keys(source, ["ORDER_NO"], None, batch=10))  # type: ignore[arg-type]
    assert [[r[0] for r in rows] for rows, _ in batches] == [
        list(range(1, 11)), list(range(11, 21)), list(range(21, 26))
    ]
    with engine.begin() as conn:
        conn.execute(delete(table).where(table.c.ORDER_NO.in_([12, 22])))
        conn.execute(update(table).where(table.c.ORDER_NO == 5).values(STATUS="X"))
    rest = list(list_keys(source, ["ORDER_NO"], batches[0][1], batch=10))  # type: ignore[arg-type]
    assert [r[0] for rows, _ in rest for r in rows] == [11, *range(13, 22), *range(23, 26)]
    with engine.connect() as conn:
        assert len(conn.execute(select(table.c.ORDER_NO)).all()) == 23
    source.close()
    engine.dispose()


# --- kill -9 through the real CLI ------------------------------------------------------


@pytest.mark.slow
def test_kill_9_during_key_sweeps_loses_and_repeats_no_delete(
    tmp_path: Path, sqlite_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    engine = create_engine(sqlite_url)
    table = create_orders(engine, 8_000)
    # Interval 0: a sweep before every poll, sixteen batches of 500 keys each: most kills land in one (with
    # fewer keys a quiet machine swept so fast that no kill of ten landed in a sweep).
    swept = {"mode": "timestamp", "deletes": {"sweep_interval": 0}}
    config = orders_config(tmp_path, db_url=sqlite_url, redis_url=redis_url, stream=stream_name, **PACED, **swept)
    next_key, clock = 8_001, dt.datetime(2027, 1, 1)
    gone: list[int] = []
    mid_sweep = [0]

    def change_the_table(rng: random.Random) -> None:
        nonlocal next_key, clock
        if (tmp_path / "outbox.db").exists():
            with closing(sqlite3.connect(tmp_path / "outbox.db")) as db, suppress(sqlite3.OperationalError):
                mid_sweep[0] += sum(r[0] for r in db.execute("SELECT running FROM sweep_sources"))
        with engine.begin() as conn:
            keys = list(conn.execute(select(table.c.ORDER_NO)).scalars())
            for key in rng.sample(keys, 20):
                clock += dt.timedelta(seconds=1)
                amount = Decimal(rng.randint(1, 10**6)) / 100
                conn.execute(update(table).values(AMOUNT=amount, CHANGED_AT=clock).where(table.c.ORDER_NO.in_([key])))
            dropped = rng.sample(keys, 10)
            conn.execute(delete(table).where(table.c.ORDER_NO.in_(dropped)))
            back = [k for k in gone[:3] if k not in keys]  # deleted earlier, now inserted again
            rows = order_rows(5, first=next_key) + [order_rows(1, first=k)[0] for k in back]
            for row in rows:
                clock += dt.timedelta(seconds=1)
                row["CHANGED_AT"] = clock
            conn.execute(insert(table), rows)
            del gone[: len(back)]
            gone.extend(dropped)
            next_key += 5

    lengths = crash_loop(config, redis_client, stream_name, kills=14, between=change_the_table)
    orders_config(tmp_path, db_url=sqlite_url, redis_url=redis_url, stream=stream_name,
                  **{**PACED, "max_rows_per_poll": None}, **swept)
    with (tmp_path / "straw.log").open("ab") as log:
        finish(config, log)  # ends the sweep a kill interrupted, delivers the rest
        finish(config, log)  # a whole sweep after every delivery
    entries = read_stream(redis_client, stream_name)
    assert_kills_landed_mid_work(lengths, len(entries))
    print(f"{mid_sweep[0]} kills landed in a sweep")
    assert mid_sweep[0] >= 1, "too few kills landed in a sweep to prove anything"
    with engine.connect() as conn:
        final = {str(r.ORDER_NO): f"{r.AMOUNT:.2f}" for r in conn.execute(select(table.c.ORDER_NO, table.c.AMOUNT))}
    assert_ends_in(entries, final)
    assert any(e["event"]["type"] == "order.deleted" for e in entries)
    outbox = Outbox(tmp_path / "outbox.db")
    try:  # what the outbox keeps is exactly the table's keys
        kept = {k for (k,) in outbox.db.execute("SELECT key FROM sweep_keys WHERE source = 'orders'")}
    finally:
        outbox.close()
    assert kept == set(final)
    engine.dispose()


def test_sweep_of_a_composite_key_lists_resumes_and_deletes_by_both_fields(
    tmp_path: Path, db_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    engine = create_engine(db_url)
    metadata = MetaData()
    lines = Table("LINES", metadata, Column("ORDER_NO", Integer, primary_key=True, autoincrement=False),
                  Column("LINE_NO", Integer, primary_key=True, autoincrement=False),
                  Column("LINE_ID", Integer, nullable=False, unique=True), Column("ITEM", String(20)))
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(lines), [{"ORDER_NO": o, "LINE_NO": n, "LINE_ID": o * 10 + n, "ITEM": f"item {o}/{n}"}
                                     for o in range(1, 6) for n in range(1, 6)])
    config = {
        "instance": "test", "redis": {"url": redis_url}, "outbox": {"path": str(tmp_path / "outbox.db")},
        "relay": {"idle_interval": 0.02},
        "entities": {"line": {"key": ["order_no", "line_no"],
                              "fields": {"order_no": "integer", "line_no": "integer", "item": "string"}}},
        "sources": [{"name": "lines", "url": db_url, "table": "LINES", "mode": "incrementing",
                     "incrementing_column": "LINE_ID", "entity": "line", "stream": stream_name, "batch_size": 1,
                     "mapping": {"order_no": "ORDER_NO", "line_no": "LINE_NO", "item": "ITEM"},
                     "deletes": {"sweep_interval": 0}}],
    }
    path = tmp_path / "straw.yaml"
    path.write_text(yaml.safe_dump(config))
    assert run_once(path).errors == []
    assert len(read_stream(redis_client, stream_name)) == 25

    loaded = load_config(path)
    pipeline = build_pipeline(loaded, loaded.sources[0])
    columns = ["ORDER_NO", "LINE_NO"]
    first = list(list_keys(pipeline.source, columns, None, batch=7))  # type: ignore[arg-type]
    assert [tuple(r) for r in first[0][0]] == [(1, 1), (1, 2), (1, 3), (1, 4), (1, 5), (2, 1), (2, 2)]
    rest = list(list_keys(pipeline.source, columns, first[0][1], batch=7))  # type: ignore[arg-type]
    assert [tuple(r) for rows, _ in rest for r in rows][:2] == [(2, 3), (2, 4)]
    assert sum(len(rows) for rows, _ in rest) == 18
    pipeline.source.close()

    with engine.begin() as conn:
        conn.execute(delete(lines).where(lines.c.ORDER_NO.in_([2, 4]), lines.c.LINE_NO.in_([3])))
        conn.execute(delete(lines).where(lines.c.ORDER_NO.in_([5])))
    assert run_once(path).errors == []
    entries = read_stream(redis_client, stream_name)[25:]
    assert [(e["event"]["type"], e["event"]["subject"]) for e in entries] == [
        ("line.deleted", s) for s in ["2/3", "4/3", "5/1", "5/2", "5/3", "5/4", "5/5"]
    ]
    assert entries[0]["event"]["data"] == {"order_no": 2, "line_no": 3}
    engine.dispose()
