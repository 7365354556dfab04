"""End to end under SIGKILL: legacy table → straw → stream → SQL loaders into PostgreSQL, MariaDB and SQLite,
each loader killed at random moments mid-work (≥ 10 times) and restarted; at the end each target equals the
legacy table row for row, and its straw_applied equals the stream's last seq. On each bus: Redis Streams,
NATS JetStream and RabbitMQ Streams."""

from __future__ import annotations

import datetime as dt
import os
import random
import signal
import subprocess
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import yaml
from sqlalchemy import MetaData, create_engine, delete, insert, select, text, update
from sqlalchemy.engine import Engine

from fixtures.legacy_orders import ORDER_ENTITY, ORDER_MAPPING, STATUSES, create_orders, order_rows, orders_table
from tests.crashes import REPO, kill_hard, straw_command
from tests.loader_buses import LoaderBus, loader_bus
from tests.nats_support import nats_url, private_nats_for_session

__all__ = ["loader_bus", "nats_url", "private_nats_for_session"]  # fixtures, imported for pytest

ZONE = ZoneInfo("Europe/Amsterdam")
KILLS = 4  # per loader; three loaders are killed side by side: 12 kills per run
SEED = int(os.environ.get("STRAW_CRASH_SEED", "0")) or random.randrange(1 << 30)


def _source(mode: str, legacy: str, stream: str) -> dict[str, Any]:
    source: dict[str, Any] = {"name": "orders", "url": legacy, "table": "ORDERS", "mode": mode, "entity": "order",
                              "stream": stream, "mapping": ORDER_MAPPING, "timezone": "Europe/Amsterdam",
                              "batch_size": 200, "poll_interval": 0.1}
    if mode == "timestamp":  # hard deletes reach the stream through the key sweep
        source.update(timestamp_column="CHANGED_AT", key_column="ORDER_NO", settle="off",
                      deletes={"sweep_interval": "300ms"})
    return source


def _config(tmp: Path, bus: LoaderBus, stream: str, legacy: str, targets: dict[str, str], mode: str) -> Path:
    config = {
        "instance": "test",
        "bus": bus.section(),
        "outbox": {"path": str(tmp / "outbox.db")},
        "relay": {"batch_size": 100, "idle_interval": 0.02, "backoff_max": 1.0},
        "entities": {"order": ORDER_ENTITY},
        "sources": [_source(mode, legacy, stream)],
        "loaders": [{"name": name, "kind": "sql", "url": url, "streams": [stream], "create_tables": True,
                     "tables": {"order": "orders"}, "batch_size": 50, "claim_idle": "300ms", "block": "200ms"}
                    for name, url in targets.items()],
    }
    path = tmp / "straw.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _mutate(engine: Engine, rng: random.Random, rounds: int, stop: threading.Event) -> None:
    """Random inserts, updates and deletes on the legacy table, between straw's polls."""
    table = orders_table(MetaData())
    next_no = 100_000
    stamp = dt.datetime(2027, 1, 1)  # every change moves CHANGED_AT forward, as timestamp mode expects
    for _ in range(rounds):
        if stop.is_set():
            return
        with engine.begin() as conn:
            keys = [k for (k,) in conn.execute(select(table.c.ORDER_NO))]
            for _ in range(15):
                choice = rng.random()
                if choice < 0.3 or not keys:
                    stamp += dt.timedelta(seconds=1)
                    row = {**order_rows(1, first=next_no, seed=rng.randrange(1000))[0], "CHANGED_AT": stamp}
                    conn.execute(insert(table), row)
                    keys.append(next_no)
                    next_no += 1
                elif choice < 0.8:
                    key = rng.choice(keys)
                    stamp += dt.timedelta(seconds=1)
                    conn.execute(update(table).where(key == table.c.ORDER_NO).values(
                        STATUS=rng.choice(STATUSES), AMOUNT=Decimal(rng.randint(1, 10**9)) / 100,
                        NOTE=rng.choice([None, "Señor Núñez ✓", "x" * rng.randint(0, 150)]),
                        CHANGED_AT=stamp))
                else:
                    key = keys.pop(rng.randrange(len(keys)))
                    conn.execute(delete(table).where(key == table.c.ORDER_NO))
        time.sleep(rng.uniform(0.05, 0.25))


def _applied(engine: Engine, stream: str) -> int:
    try:
        with engine.connect() as conn:
            found = conn.execute(text("SELECT seq FROM straw_applied WHERE stream = :s"), {"s": stream}).first()
        return int(found[0]) if found else 0
    except Exception:
        return 0  # not created yet


def _kill_loop(config: Path, name: str, target: Engine, stream: str, bus: LoaderBus, rng: random.Random,
               log: Path, kills: list[str]) -> None:
    with log.open("ab") as out:
        for _ in range(KILLS):
            proc = subprocess.Popen(straw_command(config, "load", name), cwd=REPO, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            before = _applied(target, stream)
            goal = before + rng.randint(1, 120)
            deadline = time.monotonic() + 30.0  # start-up alone takes seconds on a loaded machine
            while proc.poll() is None and time.monotonic() < deadline and _applied(target, stream) < goal \
                    and _applied(target, stream) < bus.newest_seq(stream):
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 0.05))
            assert proc.poll() is None, f"loader {name} exited by itself: {log.read_text()[-2000:]}"
            kill_hard(proc, whole_group=True)
            kills.append(f"{name}: applied {before} -> {_applied(target, stream)}")


def _canonical_source(engine: Engine) -> dict[int, tuple[Any, ...]]:
    with engine.connect() as conn:
        found = conn.execute(text("SELECT * FROM ORDERS")).mappings().all()
    return {int(r["ORDER_NO"]): (
        r["CUST_NAME"], Decimal(str(r["AMOUNT"])), r["CURRENCY"], _date(r["ORDER_DATE"]), r["STATUS"],
        r["PAID"] == "J", r["NOTE"], _instant(r["CHANGED_AT"], ZONE)) for r in found}


def _canonical_target(engine: Engine) -> dict[int, tuple[Any, ...]]:
    with engine.connect() as conn:
        found = conn.execute(text("SELECT * FROM orders")).mappings().all()
    return {int(r["order_no"]): (
        r["customer"], Decimal(str(r["amount"])), r["currency"], _date(r["order_date"]), r["status"],
        bool(int(r["paid"])), r["note"], _instant(r["changed_at"], dt.UTC)) for r in found}


def _date(value: Any) -> dt.date:
    return value if isinstance(value, dt.date) else dt.date.fromisoformat(str(value)[:10])


def _instant(value: Any, naive_zone: dt.tzinfo) -> dt.datetime:
    moment = value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(str(value))
    return (moment if moment.tzinfo else moment.replace(tzinfo=naive_zone)).astimezone(dt.UTC)


@pytest.mark.slow
@pytest.mark.parametrize(("loader_bus", "mode"), [
    ("redis", "snapshot"), ("redis", "timestamp"), ("nats", "snapshot"), ("rabbitmq", "snapshot"),
], indirect=["loader_bus"])
def test_loaders_killed_at_random_end_equal_to_the_source(
    tmp_path: Path, loader_bus: LoaderBus, sqlite_url: str, pg_url: str, mariadb_url: str, mode: str,
) -> None:
    stream_name = loader_bus.stream
    rng = random.Random(SEED)
    print(f"STRAW_CRASH_SEED={SEED}")
    legacy = create_engine(sqlite_url)
    create_orders(legacy, 1500)
    targets = {"to-sqlite": f"sqlite:///{tmp_path / 'target.db'}", "to-pg": pg_url, "to-mariadb": mariadb_url}
    config = _config(tmp_path, loader_bus, stream_name, sqlite_url, targets, mode)
    engines = {name: create_engine(url) for name, url in targets.items()}
    straw_log = (tmp_path / "straw.log").open("wb")
    straw = subprocess.Popen(straw_command(config, "run"), cwd=REPO, stdout=straw_log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    stop = threading.Event()
    mutator = threading.Thread(target=_mutate, args=(legacy, random.Random(rng.random()), 40, stop))
    kills: list[str] = []
    killers = [threading.Thread(target=_kill_loop, args=(config, name, engines[name], stream_name, loader_bus,
                                                         random.Random(rng.random()), tmp_path / f"{name}.log", kills))
               for name in targets]
    try:
        mutator.start()
        deadline = time.monotonic() + 60  # straw's start-up: the loaders are killed mid-work, not before it
        while loader_bus.newest_seq(stream_name) < 1000 and time.monotonic() < deadline:
            time.sleep(0.05)
        for killer in killers:
            killer.start()
        for killer in killers:
            killer.join()
        mutator.join()
        straw.send_signal(signal.SIGTERM)
        assert straw.wait(30) == 0, (tmp_path / "straw.log").read_text()[-2000:]
        done = subprocess.run(straw_command(config, "run", "--once"), cwd=REPO, capture_output=True, timeout=60)
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        for name in targets:  # the last run of each loader, without a kill: drains what is left
            finish = subprocess.run(straw_command(config, "load", name, "--once"), cwd=REPO, capture_output=True,
                                    timeout=120)
            assert finish.returncode == 0, finish.stdout.decode()[-2000:] + finish.stderr.decode()[-2000:]
    finally:
        stop.set()
        if straw.poll() is None:
            kill_hard(straw, whole_group=True)
        straw_log.close()
    print("\n".join(kills))
    assert len(kills) >= 3 * KILLS
    mid_work = [k for k in kills if (lambda a, b: a != b)(*k.split(": applied ")[1].split(" -> "))]
    assert len(mid_work) >= KILLS, kills  # kills that landed while records were being applied
    source = _canonical_source(legacy)
    last = loader_bus.newest_seq(stream_name)
    for name, engine in engines.items():
        target = _canonical_target(engine)
        assert set(target) == set(source), name
        wrong = [k for k in source if source[k] != target[k]]
        assert not wrong, f"{name}: {[(source[k], target[k]) for k in wrong[:3]]}"
        assert _applied(engine, stream_name) == last, name
        assert loader_bus.dead_letters(f"{stream_name}.dlq") == []
        engine.dispose()
    legacy.dispose()
