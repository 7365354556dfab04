"""RabbitMQ Streams as the bus: the slice end to end, against rstream's own pipelined publish.

`bus_rabbitmq_rows_per_s`: the slice's table and pipeline (`Runner(config).run(once=True)` from a SQLite
legacy table, fresh outbox, durable, the relay's per-batch tail read and confirm wait all timed) into a
fresh RabbitMQ stream. `rabbitmq_publish_ceiling_per_s`: the same messages (the bodies and application
properties straw wrote, rebuilt as AMQP messages before the clock starts) sent with rstream's `Producer`
the way its documentation pipelines them: `send_batch` of 1000 with a named producer and publishing ids,
never waiting between batches, the clock stopped at the last confirm. Both in the same process and run.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from typing import Any

import yaml
from rstream import AMQPMessage, ConfirmationStatus, Producer, Properties

from bench.legacy import legacy_database
from bench.services import Bench, log
from bench.slice_bench import write_config
from bus.rabbitmq import CONTENT_TYPE, RabbitStreamBus, Target, body_of, properties_of
from straw.config_load import load_config
from straw.runner import Runner

RABBITMQ_URL = os.environ.get("STRAW_BENCH_RABBITMQ_URL", "rabbitmq-stream://guest:guest@127.0.0.1:5552/")


def _straw_once(bench: Bench, db_url: str, rows: int, bus: RabbitStreamBus,
                keep: bool = False) -> tuple[float, str]:
    """Seconds for one `straw run --once` into a fresh RabbitMQ stream (deleted afterwards unless `keep`)."""
    work = bench.workdir("rabbit")
    stream = bench.stream("rabbit")
    path = write_config(work, db_url=db_url, redis_url="redis://unused:6379/0", stream=stream)
    config = yaml.safe_load(path.read_text())
    del config["redis"]
    path.write_text(yaml.safe_dump({"bus": {"url": RABBITMQ_URL}, **config}, sort_keys=False))
    try:
        started = time.perf_counter()
        result = Runner(load_config(path)).run(once=True)
        elapsed = time.perf_counter() - started
        if result.errors or result.rows_read != rows or bus.length(stream) != rows:
            raise RuntimeError(f"straw run into RabbitMQ failed: read {result.rows_read} of {rows}; {result.errors}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not keep:
            bus.delete_stream(stream)
    return elapsed, stream


async def _pipelined(stream: str, messages: list[AMQPMessage]) -> float:
    target = Target.parse(RABBITMQ_URL)
    confirmed = 0
    done = asyncio.Event()

    def on_confirm(status: ConfirmationStatus) -> None:
        nonlocal confirmed
        confirmed += 1
        if confirmed == len(messages):
            done.set()

    async with Producer(target.host, target.port, vhost=target.vhost, username=target.username,
                        password=target.password) as producer:
        await producer.create_stream(stream, exists_ok=True)
        started = time.perf_counter()
        for start in range(0, len(messages), 1000):
            await producer.send_batch(stream, messages[start:start + 1000], publisher_name="bench-ceiling",
                                      on_publish_confirm=on_confirm)
        await asyncio.wait_for(done.wait(), 300)
        elapsed = time.perf_counter() - started
        await producer.delete_stream(stream)
    return elapsed


def _same_messages(bus: RabbitStreamBus, stream: str) -> list[AMQPMessage]:
    """straw's messages as it wrote them, rebuilt (bodies and properties) with fresh publishing ids."""
    out = []
    for seq, message in enumerate(bus.read_all(stream), 1):
        rebuilt = AMQPMessage(body=body_of(message), properties=Properties(content_type=CONTENT_TYPE),
                              application_properties=properties_of(message))
        rebuilt.publishing_id = seq
        out.append(rebuilt)
    return out


def bus_rabbitmq(bench: Bench, rows: int, repeat: int) -> list[dict[str, Any]]:
    bus = RabbitStreamBus(RABBITMQ_URL, socket_timeout=30.0)
    straw_s: list[float] = []
    ceiling_s: list[float] = []
    try:
        with legacy_database(bench, "sqlite", rows) as url:
            _, warm = _straw_once(bench, url, rows, bus, keep=True)  # warm-up, and the messages straw sends
            try:
                messages = _same_messages(bus, warm)
            finally:
                bus.delete_stream(warm)
            for rep in range(repeat):
                ceiling_stream = bench.stream("rabbit-ceiling")
                # Alternate the order so neither side always runs on a warmer machine.
                if rep % 2 == 0:
                    ceiling_s.append(asyncio.run(_pipelined(ceiling_stream, messages)))
                straw_s.append(_straw_once(bench, url, rows, bus)[0])
                if rep % 2:
                    ceiling_s.append(asyncio.run(_pipelined(ceiling_stream, messages)))
    finally:
        bus.close()
    straw = sorted(rows / s for s in straw_s)[len(straw_s) // 2]
    ceiling = sorted(rows / s for s in ceiling_s)[len(ceiling_s) // 2]
    log(f"bus_rabbitmq_rows_per_s: {', '.join(f'{rows / s:,.0f}' for s in straw_s)}; "
        f"rabbitmq_publish_ceiling_per_s: {', '.join(f'{rows / s:,.0f}' for s in ceiling_s)}")
    return [
        {"measure": "bus_rabbitmq_rows_per_s", "value": straw, "unit": "rows/s",
         "baseline": "rabbitmq_publish_ceiling_per_s", "baseline_value": ceiling},
        {"measure": "rabbitmq_publish_ceiling_per_s", "value": ceiling, "unit": "messages/s"},
    ]
