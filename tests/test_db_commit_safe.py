"""No late commit is lost with the default configuration (`settle: auto`), on real PostgreSQL and MariaDB.

The scenarios of issue 15: a transaction that commits after a later one must still be delivered, in
timestamp and incrementing mode; and a stress run of overlapping writers (random lengths, rollbacks)
whose stream, folded per key, equals the table. The fallbacks (MariaDB without the PROCESS privilege,
a database reached through ODBC) run the same stress with a short settle window.
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, insert, literal_column, select, text, update
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError

from bus.redis import RedisBus
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


def _no_lock_wait(dialect: str) -> str:
    """A row lock another writer holds fails the statement at once instead of waiting for it."""
    return "SET LOCAL lock_timeout = '1ms'" if dialect == "postgresql" else "SET SESSION innodb_lock_wait_timeout = 0"


def _writers(
    engine: Engine, table: Any, mode: str, seconds: float, longest: float, seed: int, *, lock_waits: bool = True,
) -> dict[str, float]:
    """4 threads of transactions 0..`longest` s long: inserts (and in timestamp mode updates), 10 % rolled back.

    `lock_waits=False`: a statement that would wait for another writer's row lock fails instead, so no
    transaction outlasts `longest` (and a settle window longer than that is enough). `span`: the longest
    committed transaction, from its first statement to its commit.
    """
    lock = threading.Lock()
    inserted: list[int] = []
    stats = {"committed": 0, "rolled_back": 0, "failed": 0, "span": 0.0}
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
                    if not lock_waits:
                        conn.execute(text(_no_lock_wait(engine.dialect.name)))
                    began = time.monotonic()
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
                        stats["span"] = max(stats["span"], time.monotonic() - began)
            except DBAPIError:  # a deadlock or lock timeout between two writers: rolled back, as in life
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
) -> dict[str, float]:
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
        # A settle window holds only while no transaction outlasts it: there, writers do not wait for row locks
        # (a chain of waits made one transaction outlast a 2 s window on a loaded CI machine).
        lock_waits = "settle_fallback" not in settle
        stats = _writers(engine, table, mode, seconds, longest, seed=len(stream), lock_waits=lock_waits)
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
           stream=stream_name, mode=mode, settle_fallback=3, catch_up=60)


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
           client=redis_client, stream=stream_name, mode=mode, settle_fallback=3, catch_up=60)


def test_a_given_up_gap_is_watched_and_what_commits_into_it_is_taken_out_of_the_watch() -> None:
    from adapters.db.settle import GapWatch

    watch = GapWatch(window=0.2, source="orders")
    watch.admit(2, [3])
    assert watch.admit(4, [9, 10]) == (0, 4)
    time.sleep(0.25)
    assert watch.admit(4, [9, 10]) == (2, 11) and watch.late.keys() == {(4, 8)}
    assert watch.due(10) == [(4, 8)]
    assert watch.due(10) == []  # looked at within the window: not again yet
    watch.delivered([6])
    assert sorted(watch.late) == [(4, 5), (7, 8)] and watch.found_late == 1
    time.sleep(0.25)
    assert watch.due(7) == [(4, 5), (7, 7)]  # never above the watermark (a gap the read has not passed)


def _id_adder(engine: Engine) -> Callable[[Any], int]:
    """An empty orders table; what adds one order on a connection and returns the id the database gave it."""
    table = create_orders(engine, 0)

    def add(conn: Any) -> int:
        row = order_rows(1)[0]
        row.pop("ORDER_NO")  # the database assigns the id
        return int(conn.execute(insert(table), row).inserted_primary_key[0])

    return add


def _running(path: Path) -> tuple[Runner, threading.Thread, list[Any]]:
    """`straw run` of the config at `path` in a thread; its result lands in the list once stopped."""
    runner = Runner(load_config(path))
    results: list[Any] = []
    thread = threading.Thread(target=lambda: results.append(runner.run()))
    thread.start()
    return runner, thread, results


def _wait_for(client: redis.Redis, stream: str, count: int) -> list[str]:
    deadline = time.monotonic() + 30
    while len(got := subjects(client, stream)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return got


def _commit_2_after_3_is_delivered(
    engine: Engine, add: Callable[[Any], int], wait_for: Callable[[int], list[str]],
    meanwhile: Callable[[], None] = lambda: None,
) -> None:
    """Id 2 is held open while 3 commits and is delivered (the gap at 2 outlived the window: given up);
    `meanwhile` runs, then 2 commits, behind the watermark."""
    assert wait_for(1) == ["1"]
    with engine.connect() as slow:
        slow_txn = slow.begin()
        assert add(slow) == 2
        with engine.begin() as fast:
            assert add(fast) == 3
        assert wait_for(2) == ["1", "3"]
        meanwhile()
        slow_txn.commit()


@pytest.mark.parametrize("database", ["postgresql", "mariadb", "mariadb-without-process"])
def test_a_transaction_that_outlasts_the_settle_window_is_delivered_late_not_lost(
    tmp_path: Path, database: str, request: pytest.FixtureRequest, redis_url: str, redis_client: redis.Redis,
    stream_name: str,
) -> None:
    """Incrementing mode with a window (`settle_delay`, or the fallback of MariaDB without PROCESS): id 2 is
    held open past it, so the gap is given up and 3 delivered. When 2 commits, behind the watermark, it is
    found in the watched gap and delivered (it was lost). Its record carries the watermark, so the checkpoint
    stays at 3 and a replacement outbox repeats nothing."""
    url = str(request.getfixturevalue("pg_url" if database == "postgresql" else "mariadb_url"))
    straw_url, window = url, {"settle_delay": 1}
    if database == "mariadb-without-process":
        straw_url, window = str(request.getfixturevalue("no_process_url")), {"settle_fallback": 1}
    engine = create_engine(url)
    add = _id_adder(engine)
    with engine.begin() as conn:
        assert add(conn) == 1
    path = orders_config(tmp_path, db_url=straw_url, redis_url=redis_url, stream=stream_name, **window)
    runner, thread, results = _running(path)
    wait_for = partial(_wait_for, redis_client, stream_name)
    try:
        _commit_2_after_3_is_delivered(engine, add, wait_for)
        assert wait_for(3) == ["1", "3", "2"]
        time.sleep(2.5)  # the watch looks again (once a window): what it delivered is not sent twice
    finally:
        runner.stop.set()
        thread.join(timeout=60)
        engine.dispose()
    assert results and results[0].errors == []
    entries = read_stream(redis_client, stream_name)
    assert entries[2]["pos"] == entries[1]["pos"]  # the late row's record carries the watermark
    assert RedisBus(redis_client).checkpoint(stream_name).positions == {"orders": entries[1]["pos"]}
    replacement = tmp_path / "replacement"
    replacement.mkdir()
    moved = orders_config(replacement, db_url=straw_url, redis_url=redis_url, stream=stream_name, **window)
    assert run_once(moved).errors == []
    assert subjects(redis_client, stream_name) == ["1", "3", "2"]


def test_a_restart_keeps_watching_the_gaps_given_up_before_it(
    tmp_path: Path, pg_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    """The gap at 2 is given up and 3 delivered; straw stops; 2 commits while it is down. Started again, it
    finds 2 in the gap it watched (the watch was committed with the position that passed it), once; the
    metrics count the gap and the late row."""
    from prometheus_client import CollectorRegistry, generate_latest

    from outbox.store import Outbox
    from straw.metrics import OutboxCollector

    engine = create_engine(pg_url)
    add = _id_adder(engine)
    with engine.begin() as conn:
        assert add(conn) == 1
    path = orders_config(tmp_path, db_url=pg_url, redis_url=redis_url, stream=stream_name, settle_delay=1)
    runner, thread, results = _running(path)

    def stop() -> None:
        runner.stop.set()
        thread.join(timeout=60)
        assert results and results[0].errors == []

    try:
        _commit_2_after_3_is_delivered(engine, add, partial(_wait_for, redis_client, stream_name), stop)
        outbox = Outbox(tmp_path / "outbox.db")
        try:
            memo = outbox.memo("orders")
        finally:
            outbox.close()
        assert memo is not None and '"late":[[2,2,' in memo
        assert run_once(path).errors == []
        assert subjects(redis_client, stream_name) == ["1", "3", "2"]
        time.sleep(1.2)  # a window on: the watch may look again, and must not send 2 twice
        assert run_once(path).errors == []
        assert subjects(redis_client, stream_name) == ["1", "3", "2"]
    finally:
        runner.stop.set()
        thread.join(timeout=60)
        engine.dispose()
    registry = CollectorRegistry()
    registry.register(OutboxCollector(tmp_path / "outbox.db"))
    scraped = generate_latest(registry).decode()
    assert 'straw_settle_gaps_given_up_total{source="orders"} 1.0' in scraped
    assert 'straw_settle_late_rows_total{source="orders"} 1.0' in scraped
    assert 'straw_settle_gaps_watched{source="orders"} 0.0' in scraped


def test_the_gap_watch_kept_with_the_position_comes_back_without_what_expired_or_was_delivered(
    tmp_path: Path,
) -> None:
    from structlog.testing import capture_logs

    from adapters.db.settle import GapWatch
    from outbox.store import Outbox

    watch = GapWatch(window=0.1, source="orders")
    assert watch.memo() is None  # nothing given up: nothing to write with the position
    watch.admit(1, [1, 5, 9])
    time.sleep(0.15)
    assert watch.admit(2, [5, 9]) == (1, 6)  # 2..4 given up; 6..8 is young
    memo = watch.memo()
    assert memo is not None and watch.memo() == memo  # until committed, every batch carries it
    watch.committed(watch.changes)
    assert watch.memo() is None
    delivering = watch.memo(delivering=[3])  # the late batch's memo: 3 out, as once it commits
    assert delivering is not None and '"late":[[2,2,' in delivering and "[4,4," in delivering
    assert watch.late.keys() == {(2, 4)}  # not out of the watch before the commit

    later = GapWatch(window=0.1, source="orders")
    later.restore(delivering)
    assert later.late.keys() == {(2, 2), (4, 4)} and later.given_up == 1 and later.found_late == 1
    assert later.due(9) == [(2, 2), (4, 4)]  # looked at at once: a commit may have come while straw was down
    kept = orjson.loads(delivering)
    kept["late"][0][2] -= later.watched_s + 1  # 2 was given up longer ago than a gap is watched
    expired = GapWatch(window=0.1, source="orders")
    expired.restore(orjson.dumps(kept).decode())
    assert expired.late.keys() == {(4, 4)}
    for bad in ("", "[]", '{"late": [[1, 2]]}', '{"late": "x", "given_up": 0, "found_late": 0}'):
        broken = GapWatch(window=0.1, source="orders")
        with capture_logs() as logs:
            broken.restore(bad)  # unreadable: a log line, never an exception that stops the source
        assert broken.late == {} and [e["log_level"] for e in logs] == ["warning"]
    later.restore(None)  # a lease takeover: the position is the checkpoint's, the gaps of ours are not watched
    assert later.late == {} and later.memo() is None

    outbox = Outbox(tmp_path / "outbox.db")
    try:
        outbox.append("orders", "s", [], [], "[9]", 1, memo=delivering)
        outbox.append("orders", "s", [], [], "[10]", 1)  # no memo: the one kept stands
        assert outbox.memo("orders") == delivering and outbox.memo("other") is None
        outbox.take_over("s", 5, {"orders": "[7]"}, ["orders"])
        assert outbox.position("orders") == "[7]" and outbox.memo("orders") is None
    finally:
        outbox.close()


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


_NUMBER = st.integers() | st.floats()  # huge, negative, NaN and ±Inf among them
_JSON = st.recursive(
    st.none() | st.booleans() | _NUMBER | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["late", "given_up", "found_late", "watched_s", "x"]), inner, max_size=5),
    max_leaves=20,
)
_SHAPED = st.fixed_dictionaries({  # a memo as straw writes it, every value hostile
    "late": st.lists(st.tuples(_NUMBER, _NUMBER, _NUMBER | st.text(max_size=3)), max_size=4),
    "given_up": _NUMBER, "found_late": _NUMBER, "watched_s": _NUMBER,
})


@settings(max_examples=300, deadline=None)
@given(memo=st.one_of(st.text(max_size=40), _JSON.map(json.dumps), _SHAPED.map(json.dumps)))
def test_any_stored_gap_watch_is_restored_or_set_aside_never_raises(memo: str) -> None:
    """The memo is straw's own, but an outbox outlives versions and disks flip bits: whatever is in the
    table, the source reads on (a warning at worst) and a metrics scrape still answers."""
    from adapters.db.settle import GapWatch
    from straw.metrics import _Families, _settle_gaps

    watch = GapWatch(window=0.1, source="orders")
    watch.restore(memo)
    assert all(isinstance(first, int) and isinstance(last, int) for first, last in watch.late)
    watch.due(10**6)
    families = _Families()
    _settle_gaps(families, [("orders", memo)])
    for family in (families.gaps_given_up, families.gaps_watched, families.late_rows):
        assert all(isinstance(sample.value, (int, float)) for sample in family.samples)
