"""kill -9 at random moments, over and over: every source row still lands in the stream exactly once.

The child is the real CLI in continuous mode (`straw run`), the way it runs in
production, with the poller and the relay at work side by side, so kills land
in start-up, in polls, in relay rounds and between them. The final run is
`straw run --once`, which ends by itself once everything is published, so the
test needs no guess about when the work is done.

Each kill picks its moment at random (seeded; set STRAW_CRASH_SEED to replay a
run) and its victim: the main process alone, as `kill -9 PID` does (its relay
process must die with it), or every straw process at once, as a power cut does.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from contextlib import closing
from itertools import pairwise
from pathlib import Path
from typing import IO, Any

import orjson
import pytest
import redis
from sqlalchemy import create_engine, select, update

from adapters.db import position
from fixtures.legacy_orders import STATUSES, create_orders
from outbox.relay import read_checkpoint
from outbox.store import Outbox
from straw.records import event_id, source_uri
from tests.helpers import orders_config, read_stream

pytestmark = pytest.mark.slow  # deselect with -m 'not slow'
REPO = Path(__file__).resolve().parent.parent
SOURCE = source_uri("test", "orders")  # orders_config's instance and source name
# Small batches make many transactions; the per-poll cap paces the poller (at most
# 100 rows per 50 ms on any machine), so the work spans many kills instead of
# finishing before the second one.
PACED = {"batch_size": 50, "relay_batch_size": 100, "poll_interval": 0.05, "max_rows_per_poll": 100}


def straw_command(config: Path, *args: str) -> list[str]:
    script = Path(sys.executable).with_name("straw")
    head = [str(script)] if script.exists() else [sys.executable, "-m", "straw.cli"]
    return [*head, *args, "--config", str(config)]


def spawn_straw(config: Path, log: IO[bytes], *args: str) -> subprocess.Popen[bytes]:
    """`straw run` in a session of its own, so a kill can reach every process it started."""
    return subprocess.Popen(
        straw_command(config, "run", *args), cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def tail(log: Path, lines: int = 20) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def live_members(group: int) -> list[int]:
    """Processes of a process group that still run (zombies are dead, only not yet reaped)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state, ppid, pgrp, ...
        if int(fields[2]) == group and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def kill_hard(proc: subprocess.Popen[bytes], whole_group: bool) -> None:
    if whole_group:
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10.0
    while (left := live_members(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.02)
    if left:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"straw processes {left} outlived a kill -9 of their parent {proc.pid}")


def run_and_kill(config: Path, client: redis.Redis, stream: str, rng: random.Random, log: IO[bytes]) -> str:
    """Start `straw run`, SIGKILL it at a random moment; say where the moment fell."""
    before = int(client.xlen(stream))
    proc = spawn_straw(config, log)
    if rng.random() < 0.3:
        time.sleep(rng.uniform(0.0, 1.0))  # start-up: imports, config, outbox, relay process, adopt
    else:
        # Mid-work: a little after this run's first relay round, however slow the start was
        # (or, once everything is published, after a while: an idle straw is killed too).
        deadline = time.monotonic() + 2.0
        while client.xlen(stream) == before and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.5))
    assert proc.poll() is None, f"straw exited by itself (code {proc.returncode}):\n{tail(Path(log.name))}"
    kill_hard(proc, whole_group=rng.random() < 0.5)
    return where_it_died(config.parent / "outbox.db", client, stream)


def where_it_died(outbox_path: Path, client: redis.Redis, stream: str) -> str:
    """Read the state a kill left behind (for the printed summary; the child is dead)."""
    if not outbox_path.exists():
        return "start-up: no outbox yet"
    with closing(sqlite3.connect(outbox_path)) as db:
        try:
            row = db.execute("SELECT published_seq FROM streams WHERE stream = ?", (stream,)).fetchone()
            waiting = int(db.execute("SELECT count(*) FROM records").fetchone()[0])
        except sqlite3.OperationalError:
            return "start-up: outbox not set up"
    if row is None:
        return "start-up: stream not adopted"
    if read_checkpoint(client, stream).seq > row[0]:
        return "between the write to Redis and the local mark"
    return "records waiting in the outbox" if waiting else "outbox empty"


def finish(config: Path, log: IO[bytes]) -> None:
    """A last run without kills and without the pacing cap: poll to the end, publish, exit."""
    proc = spawn_straw(config, log, "--once")
    try:
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert code == 0, f"the final `straw run --once` failed with code {code}:\n{tail(Path(log.name))}"


def assert_exactly_once(entries: list[dict[str, Any]], expected_ids: set[str]) -> None:
    ids = [e["event"]["id"] for e in entries]
    twice = [i for i, n in Counter(ids).items() if n > 1]
    assert not twice, f"{len(twice)} events are in the stream more than once, e.g. {twice[:3]}"
    missing, unexpected = expected_ids - set(ids), set(ids) - expected_ids
    assert not missing, f"{len(missing)} changes never reached the stream"
    assert not unexpected, f"{len(unexpected)} events in the stream match no change of the source"
    assert len(ids) == len(expected_ids)
    seqs = [e["seq"] for e in entries]
    assert all(a < b for a, b in pairwise(seqs)), "outbox seq does not strictly increase along the stream"


def crash_loop(
    config: Path, client: redis.Redis, stream: str, kills: int, between: Callable[[random.Random], None] | None = None
) -> list[int]:
    """Kill `straw run` `kills` times; `between(rng)` runs while it is down. Returns the stream's length after each."""
    seed = int(os.environ.get("STRAW_CRASH_SEED") or random.randrange(2**32))
    print(f"crash seed {seed} (STRAW_CRASH_SEED={seed} replays it)")
    rng = random.Random(seed)
    phases: Counter[str] = Counter()
    lengths = []
    with (config.parent / "straw.log").open("ab") as log:
        for _ in range(kills):
            phases[run_and_kill(config, client, stream, rng, log)] += 1
            lengths.append(int(client.xlen(stream)))
            if between is not None:
                between(rng)
    print("where the kills landed:", dict(phases))
    print("stream length after each kill:", lengths)
    return lengths


def assert_kills_landed_mid_work(lengths: list[int], final: int) -> None:
    # The pacing guarantees this; without it the test would prove nothing.
    assert sum(n < final for n in lengths) >= 3, f"too few kills landed while there was work: {lengths}"


def test_kill_9_at_random_moments_loses_and_repeats_nothing(
    tmp_path: Path, sqlite_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    rows = 10_000
    engine = create_engine(sqlite_url)
    create_orders(engine, rows)
    engine.dispose()
    config = orders_config(tmp_path, db_url=sqlite_url, redis_url=redis_url, stream=stream_name, **PACED)

    lengths = crash_loop(config, redis_client, stream_name, kills=24)

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

    lengths = crash_loop(config, redis_client, stream_name, kills=20, between=change_rows)
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
