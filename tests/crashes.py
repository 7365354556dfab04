"""Crash-test helpers: run the real `straw` CLI, kill -9 it at random moments, check what landed.

The child is started in a session of its own, so a kill can reach every process
it started. Each kill of `crash_loop` picks its moment at random (seeded; set
STRAW_CRASH_SEED to replay a run) and its victim: the main process alone, as
`kill -9 PID` does (its relay process must die with it), or every straw process
at once, as a power cut does. `finish` is the last run without kills.
"""

from __future__ import annotations

import contextlib
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

import redis

from bus.redis import RedisBus
from bus.seam import Bus
from outbox.store import backlog_query, runs
from straw.records import source_uri

REPO = Path(__file__).resolve().parent.parent
# Published records stay in the outbox (retained): only those above their stream's published seq wait.
WAITING = backlog_query()
SOURCE = source_uri("test", "orders")  # orders_config's instance and source name
# Small batches make many transactions, so kills land between and inside them. Pacing
# by time is not enough on its own (a poll that hits its cap continues at once, so a
# fast machine publishes everything before the third kill): `crash_loop(final=...)`
# also kills at random points of the stream's progress.
PACED = {"batch_size": 50, "relay_batch_size": 100, "poll_interval": 0.05, "max_rows_per_poll": 100}



def as_bus(client: redis.Redis | Bus) -> Bus:
    """The crash loop watches any bus through the seam; a Redis client is the Redis bus."""
    return RedisBus(client) if isinstance(client, redis.Redis) else client


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


def run_and_kill(
    config: Path, client: redis.Redis | Bus, stream: str, rng: random.Random, log: IO[bytes], final: int | None = None
) -> str:
    """Start `straw run`, SIGKILL it at a random moment; say where the moment fell.

    With `final` (the stream's length once all is published), while work is left,
    the kills after start-up wait for a random point in the next eighth of it
    rather than a random time, so they land mid-work however fast the machine is."""
    before = as_bus(client).length(stream)
    proc = spawn_straw(config, log)
    try:
        choice = rng.random()
        if choice < 0.3:
            time.sleep(rng.uniform(0.0, 1.0))  # start-up: imports, config, outbox, relay process, adopt
        elif final is not None and final > before:
            target = before + rng.randint(1, max(1, (final - before) // 8))
            deadline = time.monotonic() + 10.0
            while as_bus(client).length(stream) < target and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.001)
        else:
            # Mid-work: a little after this run's first relay round, however slow the start was (a loaded
            # machine takes seconds to start straw, and a kill then lands in start-up every time); once
            # everything is published (`final` reached), after a while: an idle straw is killed too.
            idle = final is not None and final <= before
            deadline = time.monotonic() + (2.0 if idle else 20.0)
            bus = as_bus(client)
            while bus.length(stream) == before and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.5))
        assert proc.poll() is None, f"straw exited by itself (code {proc.returncode}):\n{tail(Path(log.name))}"
    except BaseException:  # the bus or the test failed mid-run: never leave a straw run behind
        with contextlib.suppress(ProcessLookupError):  # all gone already: the error above is the one to see
            kill_hard(proc, whole_group=True)
        raise
    kill_hard(proc, whole_group=rng.random() < 0.5)
    return where_it_died(config.parent / "outbox.db", client, stream)


def where_it_died(outbox_path: Path, client: redis.Redis | Bus, stream: str) -> str:
    """Read the state a kill left behind (for the printed summary; the child is dead)."""
    if not outbox_path.exists():
        return "start-up: no outbox yet"
    with closing(sqlite3.connect(outbox_path)) as db:
        try:
            row = db.execute("SELECT published_seq FROM streams WHERE stream = ?", (stream,)).fetchone()
            waiting = int(db.execute(backlog_query(runs(db))).fetchone()[0])  # a kill at start-up: not migrated yet
        except sqlite3.OperationalError:
            return "start-up: outbox not set up"
    if row is None:
        return "start-up: stream not adopted"
    if as_bus(client).checkpoint(stream).seq > row[0]:
        return "between the write to the bus and the local mark"
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


def assert_ends_in(entries: list[dict[str, Any]], final: dict[str, str]) -> None:
    """Each event once, per key never the same event twice in a row (a repeat means state lost in a
    crash), and each key's last event says what the table holds: `final` (key -> amount) upserted,
    every other key deleted."""
    assert_exactly_once(entries, {e["event"]["id"] for e in entries})  # no id twice, seq strictly increasing
    by_key: dict[str, list[tuple[str, Any]]] = defaultdict(list)
    for entry in entries:
        event = entry["event"]
        by_key[event["subject"]].append((event["type"], event["data"]))
    for key, events in by_key.items():
        repeats = [a for a, b in pairwise(events) if a == b]
        assert not repeats, f"key {key}: the same event twice in a row: {repeats[0]}"
    last = {key: events[-1] for key, events in by_key.items()}
    assert {k for k, (kind, _) in last.items() if kind == "order.upserted"} == set(final)
    assert all(last[k][1]["amount"] == amount for k, amount in final.items())
    gone = {k for k, (kind, _) in last.items() if kind == "order.deleted"}
    assert len(gone) == len(by_key) - len(final) and gone.isdisjoint(final)


def crash_loop(
    config: Path,
    client: redis.Redis | Bus,
    stream: str,
    kills: int,
    between: Callable[[random.Random], None] | None = None,
    final: Callable[[], int] | None = None,
) -> list[int]:
    """Kill `straw run` `kills` times; `between(rng)` runs while it is down. Returns the stream's length after each.

    `final()` says how long the stream will be once all the current work is published
    (see `run_and_kill`)."""
    seed = int(os.environ.get("STRAW_CRASH_SEED") or random.randrange(2**32))
    print(f"crash seed {seed} (STRAW_CRASH_SEED={seed} replays it)")
    rng = random.Random(seed)
    phases: Counter[str] = Counter()
    lengths = []
    with (config.parent / "straw.log").open("ab") as log:
        for _ in range(kills):
            goal = final() if final is not None else None
            phases[run_and_kill(config, client, stream, rng, log, goal)] += 1
            lengths.append(as_bus(client).length(stream))
            if between is not None:
                between(rng)
    print("where the kills landed:", dict(phases))
    print("stream length after each kill:", lengths)
    return lengths


def assert_kills_landed_mid_work(lengths: list[int], final: int) -> None:
    # The pacing guarantees this; without it the test would prove nothing.
    assert sum(n < final for n in lengths) >= 3, f"too few kills landed while there was work: {lengths}"


def assert_outbox_done(path: Path, rows: int) -> None:
    """The outbox read every row, published every row, holds nothing back."""
    from outbox.store import Outbox

    outbox = Outbox(path)
    try:
        (state,) = outbox.sources()
        assert (state.rows_read, state.rows_published, outbox.backlog()) == (rows, rows, 0)
    finally:
        outbox.close()
