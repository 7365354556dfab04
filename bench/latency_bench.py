"""Change latency (issue 15): commit on the legacy database -> entry on the stream, with `settle: auto`.

A writer commits 50 changes/s (one INSERT each, its own transaction) into a PostgreSQL
table that straw polls every second (timestamp mode, the demo's columns); a consumer
blocks on the stream and stamps each entry's arrival. Latency = arrival - the writer's
commit returning, per change; p50 and p99 over the run.

- `change_latency_p99_ms`: nothing else open on the database; baseline the same with
  `settle: off`. With nothing open the ledger's highest value is final at once, so the
  two should be within noise: the poll interval dominates.
- `change_latency_p99_100ms_ms`: as `change_latency_p99_ms`, polled every 100 ms (issue 14: p99 within
  the poll interval + 200 ms at both intervals); baseline the same with `settle: off`.
- `change_latency_p99_long_txn_ms`: the same with a concurrent long transaction (another
  session writes a row of another table and keeps its transaction open 2 s, over and
  over); baseline the same with `settle: off`. The gap is the price of never losing a
  late commit: rows wait for the open transaction to end.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import redis
import yaml
from sqlalchemy import MetaData, create_engine, text

import straw.runner
from adapters.db import settle as settle_module
from bench.db_bench import write_config
from bench.services import Bench, log, postgres_database
from fixtures.legacy_orders import orders_table
from outbox.store import Outbox
from straw.config_load import load_config
from straw.runner import Runner

RATE = 50.0  # changes per second
LONG_TXN = 2.0  # seconds the concurrent transaction stays open each time


def _config(directory: Path, url: str, redis_url: str, stream: str, settle: str, interval: float) -> Path:
    """The idle-poll bench's timestamp-mode config, polled every `interval` s, with the `settle` under test."""
    path = write_config(directory, db_url=url, redis_url=redis_url, stream=stream, mode="timestamp")
    config = yaml.safe_load(path.read_text())
    config["sources"][0].update(poll_interval=interval, settle=settle)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@dataclass
class Trace:
    """Wall-clock stamps along the path of each change, for `profile` (the stages of issue 14's latency)."""

    polls: list[tuple[float, float, int]] = field(default_factory=list)  # start, end, rows read
    bounds: list[tuple[float, float, int]] = field(default_factory=list)  # settle probe: start, end, looks
    written: dict[str, float] = field(default_factory=dict)  # subject -> its outbox commit returned
    xadded: dict[str, float] = field(default_factory=dict)  # subject -> its XADD (the entry id's milliseconds)


@contextmanager
def _traced(trace: Trace) -> Iterator[None]:
    """Wrap the poll, the settle probe and the outbox append of the runner in this process to stamp them.

    Only the bench's profile does this: the wrappers cost a few µs a poll and parse each event once more.
    """
    poll, bound, append = straw.runner.poll, settle_module.Ledger.bound, Outbox.append

    def traced_poll(*args: Any, **kwargs: Any) -> int:
        started = time.time()
        rows = poll(*args, **kwargs)
        trace.polls.append((started, time.time(), rows))
        return rows

    def traced_bound(self: settle_module.Ledger, *args: Any) -> settle_module.Bound:
        started = time.time()
        result = bound(self, *args)
        trace.bounds.append((started, time.time(), self.looks))
        return result

    def traced_append(self: Outbox, source: str, stream: str, events: Any, *args: Any) -> None:
        append(self, source, stream, events, *args)
        now = time.time()
        for _position, event in events:
            trace.written[orjson.loads(event)["subject"]] = now

    with ExitStack() as undo:
        for owner, name, wrapper in ((straw.runner, "poll", traced_poll), (settle_module.Ledger, "bound", traced_bound),
                                     (Outbox, "append", traced_append)):
            undo.callback(setattr, owner, name, getattr(owner, name))
            setattr(owner, name, wrapper)
        yield


def _run(
    bench: Bench, url: str, *, settle: str, long_txn: bool, seconds: float, interval: float = 1.0,
    trace: Trace | None = None,
) -> tuple[float, float]:
    work = bench.workdir(f"latency-{settle}-{long_txn}-{interval}")
    stream = bench.stream(f"latency-{settle}-{int(long_txn)}-{int(interval * 1000)}")
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text('TRUNCATE "ORDERS"'))
    runner = Runner(load_config(_config(work, url, bench.redis_url, stream, settle, interval)))
    runner_thread = threading.Thread(target=runner.run, daemon=True)
    committed: dict[str, float] = {}
    arrived: dict[str, float] = {}
    stop = threading.Event()

    def consume() -> None:
        client = redis.Redis.from_url(bench.redis_url)
        last = "0"
        while not stop.is_set():
            for _name, entries in client.xread({stream: last}, block=100) or []:
                now = time.time()
                for entry_id, fields in entries:
                    last = entry_id
                    subject = orjson.loads(fields[b"event"])["subject"]
                    arrived.setdefault(subject, now)
                    if trace is not None:  # the entry id's first part: the XADD's milliseconds (Redis's clock)
                        trace.xadded.setdefault(subject, int(entry_id.split(b"-")[0]) / 1000)
        client.close()

    def hold() -> None:
        with engine.connect() as conn:
            while not stop.is_set():
                with conn.begin():
                    conn.execute(text("INSERT INTO side_work (at) VALUES (clock_timestamp())"))
                    stop.wait(LONG_TXN)

    consumer = threading.Thread(target=consume, daemon=True)
    holder = threading.Thread(target=hold, daemon=True)
    runner_thread.start()
    consumer.start()
    time.sleep(1.0)  # the relay child is up and the first (empty) poll done
    if long_txn:
        holder.start()
    insert = text(
        'INSERT INTO "ORDERS" ("CUST_NAME", "AMOUNT", "CURRENCY", "ORDER_DATE", "STATUS", "PAID", "CHANGED_AT") '
        "VALUES ('Latency', 1.00, 'EUR', DATE '2026-11-29', 'NEW', 'N', now() AT TIME ZONE 'Europe/Amsterdam') "
        'RETURNING "ORDER_NO"'
    )
    try:
        with engine.connect() as conn:
            started = time.monotonic()
            n = 0
            while time.monotonic() - started < seconds:
                with conn.begin():
                    key = conn.execute(insert).scalar_one()
                committed[str(key)] = time.time()
                n += 1
                time.sleep(max(0.0, started + n / RATE - time.monotonic()))
        deadline = time.monotonic() + 30
        while len(arrived) < len(committed) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop.set()
        runner.stop.set()
        runner_thread.join(timeout=30)
        consumer.join(timeout=5)
        if holder.is_alive():
            holder.join(timeout=5)
        engine.dispose()
        bench.drop(stream)
        shutil.rmtree(work, ignore_errors=True)
    missing = set(committed) - set(arrived)
    if missing:
        raise RuntimeError(f"{len(missing)} of {len(committed)} changes never reached the stream")
    if trace is not None:
        _breakdown(trace, committed, arrived, f"poll every {interval:g} s, settle {settle}")
    latencies = sorted((arrived[k] - committed[k]) * 1000 for k in committed)
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    p50, p99 = statistics.median(latencies), cuts[98]
    log(f"change latency, poll every {interval:g} s, settle {settle}, long transaction {'yes' if long_txn else 'no'}: "
        f"{len(latencies)} changes, p50 {p50:.0f} ms, p99 {p99:.0f} ms, max {latencies[-1]:.0f} ms")
    return p50, p99


def _quantiles(values: list[float]) -> str:
    ordered = sorted(values)
    cuts = statistics.quantiles(ordered, n=100, method="inclusive")
    return f"p50 {statistics.median(ordered):6.1f}  p99 {cuts[98]:6.1f}  max {ordered[-1]:6.1f}"


def _breakdown(trace: Trace, committed: dict[str, float], arrived: dict[str, float], label: str) -> None:
    """Per change, ms: commit -> the first poll to start after it (the schedule), -> that poll's settle probe
    done, -> the outbox commit of the change (the read, mapping and fsync; a held row's later polls too),
    -> the XADD (the relay's wake-up and round), -> the consumer's arrival."""
    starts = [p[0] for p in trace.polls]
    stages: dict[str, list[float]] = {name: [] for name in (
        "commit->poll start", "poll start->settled", "settled->outbox commit", "outbox commit->XADD",
        "XADD->consumer", "total", "polls until taken")}
    bounds = sorted(trace.bounds)
    for key, at in committed.items():
        if key not in trace.written or key not in trace.xadded:
            continue
        seen = next((i for i, s in enumerate(starts) if s >= at), None)
        if seen is None:
            continue
        start = starts[seen]
        probe = next((b for b in bounds if b[0] >= start), None)
        settled = probe[1] if probe is not None and probe[1] <= trace.written[key] else start
        taken = next((i for i, p in enumerate(trace.polls) if p[1] >= trace.written[key]), seen)
        for name, value in (("commit->poll start", start - at), ("poll start->settled", settled - start),
                            ("settled->outbox commit", trace.written[key] - settled),
                            ("outbox commit->XADD", trace.xadded[key] - trace.written[key]),
                            ("XADD->consumer", arrived[key] - trace.xadded[key]), ("total", arrived[key] - at)):
            stages[name].append(value * 1000)
        stages["polls until taken"].append(float(taken - seen + 1))
    cycle = [b[0] - a[0] for a, b in zip(trace.polls, trace.polls[1:], strict=False)]
    looks = [float(b[2]) for b in trace.bounds]
    log(f"profile, {label}: {len(stages['total'])} changes, {len(trace.polls)} polls")
    for name, values in (*stages.items(), ("poll start->next poll start", [c * 1000 for c in cycle]),
                         ("settle looks per probe", looks)):
        if len(values) > 1:
            log(f"  {name:28} {_quantiles(values)}")


def profile(seconds: float, interval: float, settles: list[str]) -> None:
    """`python -m bench.latency_bench SECONDS INTERVAL SETTLE...`: the latency runs with the stage breakdown."""
    with ExitStack() as stack, postgres_database() as url:
        bench = Bench(stack)
        _prepare(url)
        for settle in settles:
            trace = Trace()
            with _traced(trace):
                _run(bench, url, settle=settle, long_txn=False, seconds=seconds, interval=interval, trace=trace)


def _prepare(url: str) -> None:
    engine = create_engine(url)
    metadata = MetaData()
    orders_table(metadata, "ORDERS")
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE side_work (id serial PRIMARY KEY, at timestamptz)"))
    engine.dispose()


def change_latency(bench: Bench, quick: bool) -> list[dict[str, Any]]:
    seconds = 1.5 if quick else 60.0  # issue 14: 50 changes/s for 60 s
    with postgres_database() as url:
        _prepare(url)
        figures = {
            (settle, long_txn, interval): _run(bench, url, settle=settle, long_txn=long_txn, seconds=seconds,
                                               interval=interval)
            for long_txn, interval in ((False, 1.0), (False, 0.1), (True, 1.0)) for settle in ("auto", "off")
        }
    results = []
    for long_txn, interval, measure in ((False, 1.0, "change_latency_p99_ms"),
                                        (False, 0.1, "change_latency_p99_100ms_ms"),
                                        (True, 1.0, "change_latency_p99_long_txn_ms")):
        value, baseline = figures[("auto", long_txn, interval)][1], figures[("off", long_txn, interval)][1]
        results.append({"measure": measure, "value": round(value, 1), "unit": "ms", "baseline": "settle_off",
                        "baseline_value": round(baseline, 1)})
    return results


if __name__ == "__main__":
    profile(float(sys.argv[1]), float(sys.argv[2]), sys.argv[3:] or ["auto", "off"])
