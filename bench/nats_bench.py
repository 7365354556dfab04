"""The slice on NATS JetStream, and nats-py's own pipelined-publish ceiling on the same payloads.

`bus_nats_rows_per_s`: the slice's SQLite table and pipeline (`bench/slice_bench.py`:
the real config loader, `Runner(config).run(once=True)`) with `bus.url: nats://...`,
into a fresh JetStream stream each repetition. `nats_publish_ceiling_per_s`: the
messages that run stored (same bodies, same Nats-Msg-Id), published again with
nats-py's `publish_async` (no expectation headers, no outbox, no database) and
every ack awaited: what this client can push into this server on this machine.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
import uuid

import yaml

from bench.services import Bench, log
from bench.slice_bench import write_config
from bus.nats_connect import connect_once
from fixtures.private_nats import delete_jetstream
from straw.config_load import load_config
from straw.runner import Runner

NATS_URL = os.environ.get("STRAW_BENCH_NATS_URL", "nats://127.0.0.1:4222")
Message = tuple[bytes, dict[str, str]]


def _name() -> str:
    return f"straw_bench_{uuid.uuid4().hex[:10]}"


async def _read(name: str, subject: str, count: int) -> list[Message]:
    nc = await connect_once(NATS_URL, timeout=5)
    try:
        sub = await nc.jetstream().subscribe(subject, stream=name, ordered_consumer=True)
        found: list[Message] = []
        while len(found) < count:
            msg = await sub.next_msg(timeout=10)
            kept = ("Nats-Msg-Id", "Content-Type")
            found.append((msg.data, {k: v for k, v in (msg.headers or {}).items() if k in kept}))
        return found
    finally:
        await nc.close()


def run_straw_nats(bench: Bench, db_url: str, rows: int, *, keep: bool = False) -> tuple[float, list[Message]]:
    """Seconds for one `straw run --once` into a fresh JetStream stream; with `keep`, the messages it stored."""
    work = bench.workdir("straw-nats")
    name = _name()
    subject = f"{name}.orders"
    try:
        path = write_config(work, db_url=db_url, redis_url="redis://unused", stream=subject)
        data = yaml.safe_load(path.read_text())
        data.pop("redis")
        data["bus"] = {"url": NATS_URL, "jetstream": {"stream": name}}
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        config = load_config(path)
        started = time.perf_counter()
        result = Runner(config).run(once=True)
        elapsed = time.perf_counter() - started
        if result.errors or result.rows_read != rows:
            raise RuntimeError(f"straw run failed: read {result.rows_read} of {rows} rows; {result.errors}")
        stored = asyncio.run(_read(name, subject, rows)) if keep else []
    finally:
        shutil.rmtree(work, ignore_errors=True)
        delete_jetstream(NATS_URL, name)
    return elapsed, stored


async def _publish_all(messages: list[Message]) -> float:
    name = _name()
    nc = await connect_once(NATS_URL, timeout=5)
    js = nc.jetstream(timeout=30)
    try:
        await js.add_stream(name=name, subjects=[f"{name}.orders"])
        started = time.perf_counter()
        acks = [await js.publish_async(f"{name}.orders", body, headers=dict(headers)) for body, headers in messages]
        done = await asyncio.gather(*acks)
        elapsed = time.perf_counter() - started
        if len(done) != len(messages) or any(a.duplicate for a in done):
            raise RuntimeError("the ceiling run did not store every message")
        return elapsed
    finally:
        try:
            await js.delete_stream(name)
        finally:
            await nc.close()


def publish_ceiling(messages: list[Message]) -> float:
    """Seconds for nats-py to publish every message pipelined (publish_async) and get every ack."""
    return asyncio.run(_publish_all(messages))


def ceiling_messages(samples: list[Message], rows: int) -> list[Message]:
    """`rows` messages cycling over the samples, each with a Nats-Msg-Id of its own (no dedup hits)."""
    return [(body, {**headers, "Nats-Msg-Id": f"{headers['Nats-Msg-Id']}-{i}"})
            for i, (body, headers) in ((i, samples[i % len(samples)]) for i in range(rows))]


def measure(bench: Bench, db_url: str, rows: int, repeat: int) -> tuple[list[float], list[float]]:
    """Alternating runs of straw on NATS and the ceiling; their seconds."""
    _, samples = run_straw_nats(bench, db_url, rows, keep=True)  # warm-up, and the payloads of the ceiling
    messages = ceiling_messages(samples, rows)
    log(f"nats: {len(samples)} messages from a straw run, {sum(len(b) for b, _ in samples) / len(samples):.0f} bytes "
        "of body on average")
    straw_s: list[float] = []
    ceiling_s: list[float] = []
    for rep in range(repeat):
        if rep % 2:
            straw_s.append(run_straw_nats(bench, db_url, rows)[0])
            ceiling_s.append(publish_ceiling(messages))
        else:
            ceiling_s.append(publish_ceiling(messages))
            straw_s.append(run_straw_nats(bench, db_url, rows)[0])
    return straw_s, ceiling_s


def available() -> bool:
    async def probe() -> bool:
        try:
            nc = await connect_once(NATS_URL, timeout=2)
        except Exception:
            return False
        await nc.close()
        return True

    return asyncio.run(probe())

