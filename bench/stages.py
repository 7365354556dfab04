"""Where the slice's time goes: each stage timed alone, one after the other, on the same rows.

    python bench/stages.py [--rows N] [--postgres]
    python bench/stages.py --cpu [--runs N] [--rows N] [--postgres]

`--cpu` prints instead the CPU time per row of the runner process and of the relay
child (user + system, `os.times`), the median of `--runs` slices: unlike wall
times, these hardly move when other work shares the cores.

Not part of the `bench/run.py` contract: a diagnostic table for whoever
optimises the slice. Each stage runs single-threaded with nothing competing,
so the sum is what one core would need; the end-to-end run shows how much of
that the real runner overlaps (poller and relay in two processes) or loses
(lock waits, fsyncs, idle polls).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.ceiling import xadd_pipelined
from bench.legacy import legacy_database
from bench.services import Bench, log
from bench.slice_bench import run_straw, write_config
from bus.redis import RedisBus
from outbox.relay import Relay, adopt_streams
from outbox.store import Outbox
from straw import logs, records
from straw.config_load import load_config
from straw.runner import build_pipeline
from straw.source import RawBatch


class Table:
    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.lines: list[tuple[str, float]] = []

    @contextmanager
    def time(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        self.add(stage, time.perf_counter() - started)

    def add(self, stage: str, seconds: float) -> None:
        self.lines.append((stage, seconds))
        log(f"{stage}: {seconds:.3f} s")

    def print(self, reference: str) -> None:
        ref = dict(self.lines)[reference]
        print(f"{'stage':58} {'seconds':>8} {'rows/s':>10} {'of e2e':>7}")
        for stage, seconds in self.lines:
            print(f"{stage:58} {seconds:8.3f} {self.rows / seconds:10,.0f} {seconds / ref:7.0%}")


def _poller_stages(table: Table, pipeline: Any, outbox_path: Path, stream: str) -> None:
    """Fetch, map (coercion and encoding apart), append.

    Each stage consumes batch by batch and drops its output, as the runner does:
    keeping 100,000 fresh results alive would time the allocator, not the stage.
    """
    with table.time("poller: legacy fetch (DbSource.read, incl. positions)"):
        for _ in pipeline.source.read(None):
            pass
    batches: list[RawBatch] = list(pipeline.source.read(None))
    calls: list[dict[str, Any]] = []

    def capture(**kwargs: Any) -> bytes:
        calls.append(kwargs)
        return b""

    with mock.patch("straw.mapping.encode_event", capture):
        for batch in batches:
            pipeline.mapper.map(batch)
    with table.time("poller: map + encode (Mapper.map as the runner calls it)"):
        for batch in batches:
            pipeline.mapper.map(batch)
    with table.time("poller: event encoding alone (encode_event)"):
        for kwargs in calls:
            records.encode_event(**kwargs)
    calls.clear()
    lines = dict(table.lines)
    table.add("poller: mapping/coercion (map + encode minus encoding)",
              lines["poller: map + encode (Mapper.map as the runner calls it)"]
              - lines["poller: event encoding alone (encode_event)"])
    mapped = [pipeline.mapper.map(batch) for batch in batches]
    for sync in ("FULL", "NORMAL"):
        path = outbox_path.with_name(f"append-{sync}.db")
        outbox = Outbox(path, synchronous=sync)
        outbox.adopt(stream, 0, {})
        label = "default" if sync == "FULL" else "for comparison"
        with table.time(f"poller: outbox append, synchronous={sync} ({label})"):
            for batch, out in zip(batches, mapped, strict=True):
                outbox.append(pipeline.spec.name, stream, out.events, [], batch.positions[-1], len(batch.rows))
        outbox.close()


def _relay_stages(table: Table, bench: Bench, outbox_path: Path, stream: str) -> None:
    """Relay alone on a full outbox, then its parts: read, send, mark published."""
    outbox = Outbox(outbox_path.with_name("append-FULL.db"))
    pending = []
    with table.time("relay: outbox read (Outbox.pending, 1000 per call)"):
        after = 0
        while batch := outbox.pending(stream, after, 1000):
            pending.extend(batch)
            after = batch[-1].seq
    entries = [{b"seq": str(p.seq).encode(), b"pos": p.position.encode(), b"event": p.event} for p in pending]
    table.add("relay: XADD pipelines of 1000, no transaction (ceiling)", xadd_pipelined(bench, entries))
    adopt_streams(RedisBus(bench.redis), outbox, [stream])
    relay = Relay(RedisBus(bench.redis), outbox, batch_size=1000)
    with table.time("relay: alone on a full outbox (Relay.publish until empty)"):
        while relay.publish(stream).more:
            pass
    if bench.redis.xlen(stream) != table.rows:
        raise RuntimeError(f"relay published {bench.redis.xlen(stream)} of {table.rows} records")
    bench.drop(stream)
    outbox.close()
    refill = Outbox(outbox_path.with_name("append-NORMAL.db"))
    # A row is a run of up to 1,000 records (a poll batch) and its seq is the run's last: one mark per row.
    seqs = [row[0] for row in refill.db.execute("SELECT seq FROM records ORDER BY seq").fetchall()]
    with table.time("relay: mark_published per 1000 (COMMIT, FULL; records stay, retained)"):
        for upto in seqs:
            refill.mark_published(stream, upto)
    refill.close()


def cpu_per_row(bench: Bench, url: str, rows: int, runs: int) -> tuple[float, float]:
    """Median CPU µs per row of the runner (this process) and of the relay child over `runs` slices."""
    runner, child = [], []
    for _ in range(runs):
        before = os.times()
        run_straw(bench, url, rows)
        after = os.times()
        runner.append((after.user + after.system - before.user - before.system) / rows * 1e6)
        child.append((after.children_user + after.children_system
                      - before.children_user - before.children_system) / rows * 1e6)
    log(f"cpu µs/row runner {[round(x, 2) for x in runner]}, relay child {[round(x, 2) for x in child]}")
    return statistics.median(runner), statistics.median(child)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--postgres", action="store_true", help="legacy table in PostgreSQL instead of SQLite")
    parser.add_argument("--cpu", action="store_true", help="only the CPU µs per row of runner and relay child")
    parser.add_argument("--runs", type=int, default=5, help="slices measured with --cpu (median)")
    args = parser.parse_args()
    logs.setup("WARNING")
    table = Table(args.rows)
    with ExitStack() as stack:
        bench = Bench(stack)
        url = stack.enter_context(legacy_database(bench, "postgresql" if args.postgres else "sqlite", args.rows))
        run_straw(bench, url, args.rows)  # warm-up
        if args.cpu:
            runner, child = cpu_per_row(bench, url, args.rows, args.runs)
            print(f"cpu µs per row (median of {args.runs}, load {os.getloadavg()[0]:.2f}): "
                  f"runner {runner:.2f}, relay child {child:.2f}, both {runner + child:.2f}")
            return 0
        table.add("end to end: Runner.run(once=True)", run_straw(bench, url, args.rows)[0])
        work = bench.workdir("stages")
        stream = bench.stream("stages")
        config = load_config(write_config(work, db_url=url, redis_url=bench.redis_url, stream=stream))
        pipeline = build_pipeline(config, config.sources[0])
        try:
            _poller_stages(table, pipeline, work / "outbox.db", stream)
        finally:
            pipeline.source.close()
        _relay_stages(table, bench, work / "outbox.db", stream)
    table.print("end to end: Runner.run(once=True)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
