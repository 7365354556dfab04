"""No late commit is lost with the default configuration (`settle: auto`), on real PostgreSQL and MariaDB.

The scenarios of issue 15: a transaction that commits after a later one must still be delivered, in
timestamp and incrementing mode; and a stress run of overlapping writers (random lengths, rollbacks)
whose stream, folded per key, equals the table. The fallbacks (MariaDB without the PROCESS privilege,
a database reached through ODBC) run the same stress with a short settle window.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import create_engine, insert, literal_column, select, text, update
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError

from fixtures.legacy_orders import create_orders, order_rows
from straw.config_load import load_config
from straw.runner import Runner
from tests.helpers import orders_config, read_stream, run_once


@pytest.fixture(params=["postgresql", "mariadb"])
def server_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue("pg_url" if request.param == "postgresql" else "mariadb_url"))


def subjects(client: redis.Redis, stream: str) -> list[str]:
    return [e["event"]["subject"] for e in read_stream(client, stream)]


@pytest.mark.parametrize("mode", ["timestamp", "incrementing"])
@pytest.mark.parametrize("settle", ["auto", "off"])
def test_a_transaction_committing_after_a_later_one_is_delivered_by_default(
    tmp_path: Path, server_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str,
    mode: str, settle: str,
) -> None:
    """A holds id 1 (the older timestamp) open; B commits id 2 first; C comes after A commits.

    `settle: off` is the old default and shows the loss the default now prevents.
    """
    engine = create_engine(server_url)
    table = create_orders(engine, 0)
    a, b, c = order_rows(3)
    extra = {} if settle == "auto" else {"settle": "off"}
    path = orders_config(tmp_path, db_url=server_url, redis_url=redis_url, stream=stream_name, mode=mode, **extra)
    with engine.connect() as slow:
        slow_txn = slow.begin()
        slow.execute(insert(table), [a])
        with engine.begin() as fast:
            fast.execute(insert(table), [b])
        first = run_once(path)
        slow_txn.commit()
    with engine.begin() as conn:
        conn.execute(insert(table), [c])
    assert first.errors == [] and run_once(path).errors == []
    if settle == "auto":
        assert first.rows_read == 0  # B's row waits: A was open when it became visible
        assert subjects(redis_client, stream_name) == ["1", "2", "3"]
    else:
        assert subjects(redis_client, stream_name) == ["2", "3"]  # A's row is behind the watermark: lost
    engine.dispose()


def test_rows_arrive_while_some_transaction_is_always_open(
    tmp_path: Path, server_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    """A busy ERP always has a transaction open somewhere: each one ends, but another has begun.

    A poll's looks pass what the ended ones held; a later look of the same poll that holds the newest
    rows again must not take that back (it did: nothing arrived until the writers stopped).
    """
    engine = create_engine(server_url)
    table = create_orders(engine, 0)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE side_work (id INTEGER PRIMARY KEY)"))
    path = orders_config(tmp_path, db_url=server_url, redis_url=redis_url, stream=stream_name)
    stop = threading.Event()
    committed: list[tuple[float, str]] = []

    def hold() -> None:  # back-to-back half-second transactions: never a moment with none open
        with engine.connect() as conn:
            n = 0
            while not stop.is_set():
                n += 1
                with conn.begin():
                    conn.execute(text(f"INSERT INTO side_work VALUES ({n})"))
                    stop.wait(0.5)

    def write() -> None:  # a row every 30 ms, each in a transaction of its own
        with engine.connect() as conn:
            for row in order_rows(2000):
                if stop.is_set():
                    return
                with conn.begin():
                    conn.execute(insert(table), [row])
                committed.append((time.monotonic(), str(row["ORDER_NO"])))
                time.sleep(0.03)

    threads = [threading.Thread(target=hold, daemon=True), threading.Thread(target=write, daemon=True)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.0)
        for _ in range(5):
            assert run_once(path).errors == []
        settled_since = time.monotonic() - 4.0
        delivered = set(subjects(redis_client, stream_name))
        older = {key for at, key in committed if at < settled_since}
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
        engine.dispose()
    assert older, "the writer committed nothing early enough"
    assert older <= delivered, f"{len(older - delivered)} of {len(older)} rows committed over 4 s ago not delivered"


# --- stress: overlapping writers, random lengths, rollbacks ------------------------------------------------


def _now_sql(dialect: str) -> str:
    return "(now() AT TIME ZONE 'UTC')" if dialect == "postgresql" else "UTC_TIMESTAMP(6)"


def _writers(engine: Engine, table: Any, mode: str, seconds: float, longest: float, seed: int) -> dict[str, int]:
    """4 threads of transactions 0..`longest` s long: inserts (and in timestamp mode updates), 10 % rolled back."""
    lock = threading.Lock()
    inserted: list[int] = []
    stats = {"committed": 0, "rolled_back": 0, "failed": 0}
    now = literal_column(_now_sql(engine.dialect.name))
    deadline = time.monotonic() + seconds

    def writer(number: int) -> None:
        rng = random.Random(seed * 10 + number)
        while time.monotonic() < deadline:
            steps = rng.randint(1, 3)
            length = rng.uniform(0, longest)
            try:
                with engine.connect() as conn:
                    txn = conn.begin()
                    for _ in range(steps):
                        with lock:
                            known = list(inserted)
                        if mode == "timestamp" and known and rng.random() < 0.4:
                            key = rng.choice(known)
                            conn.execute(update(table).where(key == table.c.ORDER_NO).values(
                                STATUS=rng.choice(["OPEN", "PAID", "SHIPPED"]), CHANGED_AT=now))
                        else:  # the database assigns the id (serial / AUTO_INCREMENT), as an ERP's does
                            row = order_rows(1, first=rng.randint(1, 10_000))[0]
                            row.pop("ORDER_NO")
                            stmt = insert(table)
                            if mode == "timestamp":
                                row.pop("CHANGED_AT")
                                stmt = stmt.values(CHANGED_AT=now)
                            key = conn.execute(stmt, row).inserted_primary_key[0]
                            with lock:
                                inserted.append(key)
                        time.sleep(length / steps)
                    if rng.random() < 0.1:
                        txn.rollback()
                        stats["rolled_back"] += 1
                    else:
                        txn.commit()
                        stats["committed"] += 1
            except DBAPIError:  # a deadlock between two writers: that transaction is rolled back, as in life
                stats["failed"] += 1

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return stats


def _table_state(engine: Engine, table: Any) -> dict[str, str]:
    with engine.connect() as conn:
        return {str(no): str(status) for no, status in conn.execute(select(table.c.ORDER_NO, table.c.STATUS))}


def _folded(client: redis.Redis, stream: str) -> tuple[dict[str, str], int]:
    """The stream folded per key (last status wins), and how many entries repeat a (key, version) already seen."""
    folded: dict[str, str] = {}
    seen: set[tuple[str, str]] = set()
    repeats = 0
    for entry in read_stream(client, stream):
        event = entry["event"]
        version = (event["subject"], str(event["data"].get("changed_at")))
        repeats += version in seen
        seen.add(version)
        folded[event["subject"]] = str(event["data"]["status"])
    return folded, repeats


def stress(
    tmp_path: Path, *, writer_url: str, straw_url: str, redis_url: str, client: redis.Redis, stream: str, mode: str,
    seconds: float = 4.0, longest: float = 1.5, catch_up: float = 30.0, **settle: Any,
) -> dict[str, int]:
    engine = create_engine(writer_url)
    table = create_orders(engine, 0)
    if engine.dialect.name in ("mysql", "mariadb"):
        # Microseconds, as timestamp mode needs: with whole seconds a writer starting within the newest
        # row's second can commit its timestamp with a lower key (README, "Late commits").
        with engine.begin() as conn:
            conn.execute(text("ALTER TABLE ORDERS MODIFY CHANGED_AT DATETIME(6)"))
    path = orders_config(tmp_path, db_url=straw_url, redis_url=redis_url, stream=stream, mode=mode,
                         poll_interval=0.2, timezone="UTC", **settle)
    runner = Runner(load_config(path))
    results: list[Any] = []
    thread = threading.Thread(target=lambda: results.append(runner.run()))
    thread.start()
    try:
        stats = _writers(engine, table, mode, seconds, longest, seed=len(stream))
        expected = _table_state(engine, table)
        deadline = time.monotonic() + catch_up
        folded, repeats = _folded(client, stream)
        while folded != expected and time.monotonic() < deadline:
            time.sleep(0.5)
            folded, repeats = _folded(client, stream)
    finally:
        runner.stop.set()
        thread.join(timeout=60)
        engine.dispose()
    assert results and results[0].errors == []
    missing = sorted(set(expected) - set(folded), key=int)
    stale = sorted((k for k in expected if k in folded and folded[k] != expected[k]), key=int)
    assert (missing, stale, repeats) == ([], [], 0), f"{len(expected)} rows, writers {stats}"
    assert stats["committed"] > 5 and stats["rolled_back"] + stats["failed"] > 0, stats
    return stats


@pytest.mark.parametrize("mode", ["timestamp", "incrementing"])
def test_overlapping_writers_lose_nothing_with_the_default(
    tmp_path: Path, server_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str, mode: str
) -> None:
    stress(tmp_path, writer_url=server_url, straw_url=server_url, redis_url=redis_url, client=redis_client,
           stream=stream_name, mode=mode)


@pytest.fixture
def no_process_url(mariadb_url: str) -> Iterator[str]:
    """A MariaDB user that may read the scratch database but lacks PROCESS (no information_schema.innodb_trx)."""
    url = make_url(mariadb_url)
    user, password = f"np_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    admin = create_engine(mariadb_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE USER '{user}'@'%' IDENTIFIED BY '{password}'"))
        conn.execute(text(f"GRANT SELECT ON `{url.database}`.* TO '{user}'@'%'"))
    try:
        yield url.set(username=user, password=password).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP USER '{user}'@'%'"))
        admin.dispose()


@pytest.mark.parametrize("mode", ["timestamp", "incrementing"])
def test_without_process_privilege_a_settle_window_loses_nothing(
    tmp_path: Path, mariadb_url: str, no_process_url: str, redis_url: str, redis_client: redis.Redis,
    stream_name: str, mode: str,
) -> None:
    stress(tmp_path, writer_url=mariadb_url, straw_url=no_process_url, redis_url=redis_url, client=redis_client,
           stream=stream_name, mode=mode, settle_fallback=2)


def test_straw_check_names_the_technique_and_the_missing_privilege(
    tmp_path: Path, mariadb_url: str, no_process_url: str, pg_url: str, sqlite_url: str,
) -> None:
    from adapters.db.poller import DbSource
    from straw.config import DbSourceSpec

    for url in (pg_url, mariadb_url, sqlite_url):
        engine = create_engine(url)
        create_orders(engine, 1)
        engine.dispose()
    for url, expected in [
        (pg_url, "settle: pg transaction horizon"),
        (mariadb_url, "settle: innodb open transactions"),
        (no_process_url, "settle: window 30s (no PROCESS privilege"),
        (sqlite_url, "settle: off (SQLite: one writer"),
    ]:
        spec = load_config(orders_config(tmp_path, db_url=url, redis_url="redis://unused", stream="s")).sources[0]
        assert isinstance(spec, DbSourceSpec)
        source = DbSource(spec, ["ORDER_NO"])
        try:
            assert expected in source.check(), url
        finally:
            source.close()


@pytest.mark.parametrize("mode", ["timestamp", "incrementing"])
def test_through_odbc_a_settle_window_and_gap_aware_ids_lose_nothing(
    tmp_path: Path, pg_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str, mode: str
) -> None:
    from tests.test_db_odbc import odbc_url

    stress(tmp_path, writer_url=pg_url, straw_url=odbc_url("postgresql", pg_url), redis_url=redis_url,
           client=redis_client, stream=stream_name, mode=mode, settle_fallback=2)


def test_gap_aware_ids_stop_at_a_young_gap_and_give_it_up_once_older_than_the_window() -> None:
    from adapters.db.settle import GapWatch

    watch = GapWatch(window=0.3, source="orders")
    assert watch.admit(1, [1, 2, 4, 5]) == (2, 3)  # 3 is missing: 4 and 5 wait, the watermark stays at 2
    assert watch.admit(3, [4, 5]) == (0, 3)  # re-checked at the next poll: still young
    assert watch.admit(3, [3, 4, 5]) == (3, 6) and watch.given_up == 0  # the late commit filled it
    assert watch.admit(6, [8]) == (0, 6)
    time.sleep(0.35)
    assert watch.admit(6, [8, 9]) == (2, 10) and watch.given_up == 1  # older than the window: a rollback
    assert watch.admit(None, [20, 21]) == (2, 22)  # no watermark yet: nothing to call a gap
    assert watch.admit(22, [Decimal(23)]) == (0, 22)  # a NUMBER id over ODBC is an id all the same
    assert watch.admit(None, ["A-1", "A-3"]) == (2, None)  # text ids: no gaps to see
