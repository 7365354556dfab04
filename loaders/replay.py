"""Move a consumer group back to a `seq` or a time, so the loader applies the stream again from there.

Redis: the group's last-delivered id (`--from-seq` or `--from-time`). NATS JetStream: the group's durable
consumer made again to start at a stream sequence. RabbitMQ Streams: the group's stored offset. On NATS and
RabbitMQ only `--from-seq` (README, Loaders). Stop the group's loaders first: a running member keeps its
own place (its pulled messages, its offset) and may store it again."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
from contextlib import suppress
from typing import Any

import nats.js.errors
import redis
from rstream import Consumer

from bus.names import JetStreamOptions
from bus.nats import SEQ
from bus.rabbitmq import FAILURES, RabbitStreamBus, Target, properties_of, translate
from loaders.nats_consumer import NatsLoop, consumer_config, durable_name
from loaders.rabbitmq_consumer import reference
from loaders.redis_consumer import ensure_group
from straw.config_loaders import AnyLoaderSpec

_PAGE = 1000
_MAX_SEQ_PART = 2**64 - 1


class ReplayError(Exception):
    pass


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def before(entry_id: str) -> str:
    """The largest id below `entry_id`: the group's last-delivered id, so `entry_id` is delivered next."""
    ms, seq = (int(p) for p in entry_id.split("-"))
    if seq:
        return f"{ms}-{seq - 1}"
    return f"{ms - 1}-{_MAX_SEQ_PART}" if ms else "0-0"


def first_at_seq(client: redis.Redis, stream: str, seq: int) -> tuple[str, int] | None:
    """The first entry whose `seq` is at least `seq` (seq grows along the stream), and its seq."""
    start = "-"
    while True:
        page: Any = client.xrange(stream, min=start, count=_PAGE)
        for entry_id, fields in page:
            found = int(fields.get(b"seq", 0))
            if found >= seq:
                return _text(entry_id), found
        if len(page) < _PAGE:
            return None
        start = "(" + _text(page[-1][0])


def rewind(client: redis.Redis, stream: str, group: str, *, from_seq: int | None, from_time: str | None) -> str:
    ensure_group(client, stream, group, "begin")
    if from_seq is not None:
        found = first_at_seq(client, stream, from_seq)
        if found is None:
            raise ReplayError(f"{stream} has no entry with seq {from_seq} or later")
        entry_id, seq = found
        oldest = client.xrange(stream, count=1)
        note = ""
        if seq > from_seq and oldest and _text(oldest[0][0]) == entry_id:
            note = f" (the stream starts at seq {seq}: older entries were trimmed)"
        client.xgroup_setid(stream, group, before(entry_id))
        return f"group {group} replays from seq {seq} (entry {entry_id}){note}"
    assert from_time is not None
    try:
        moment = dt.datetime.fromisoformat(from_time)
    except ValueError:
        raise ReplayError(f"--from-time {from_time!r} is not an ISO time; write e.g. 2026-11-29T10:00:00") from None
    moment = moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)
    entry_id = f"{int(moment.timestamp() * 1000)}-0"
    client.xgroup_setid(stream, group, before(entry_id))
    return f"group {group} replays entries added since {moment.isoformat()}"


def rewind_nats(url: str, options: JetStreamOptions, spec: AnyLoaderSpec, stream: str, from_seq: int) -> str:
    """The group's durable consumer on the subject, made again to start at the first message with `seq` >=
    `from_seq` (found by bisection: the next message of the subject at or after a stream sequence has a `seq`
    that never decreases along the stream)."""
    io = NatsLoop(url, 10.0)

    async def work() -> str:
        js = await io.connect()
        try:
            info = await js.stream_info(options.stream)
        except nats.js.errors.NotFoundError:
            raise ReplayError(f"JetStream stream {options.stream!r} does not exist") from None

        async def next_at(position: int) -> tuple[int, int] | None:
            try:
                msg = await js.get_msg(options.stream, position, subject=stream, next=True)
            except nats.js.errors.NotFoundError:
                return None
            return int(msg.seq or 0), int((msg.headers or {}).get(SEQ, 0) or 0)

        low, high = int(info.state.first_seq or 1), int(info.state.last_seq or 0) + 1
        while low < high:
            middle = (low + high) // 2
            found = await next_at(middle)
            if found is None or found[1] >= from_seq:
                high = middle
            else:
                low = found[0] + 1
        first = await next_at(low)
        if first is None or first[1] < from_seq:
            raise ReplayError(f"{stream} has no message with seq {from_seq} or later")
        oldest = await next_at(int(info.state.first_seq or 1))
        name = durable_name(spec.group_name, stream)
        with suppress(nats.js.errors.NotFoundError):
            await js.delete_consumer(options.stream, name)
        await js.add_consumer(options.stream, consumer_config(
            spec.group_name, stream, claim_idle=spec.claim_idle, max_deliveries=spec.max_deliveries,
            start=spec.start, from_stream_seq=first[0]))
        note = ""
        if first[1] > from_seq and oldest is not None and oldest[0] == first[0]:
            note = f" (the subject starts at seq {first[1]}: older messages are gone)"
        return f"group {spec.group_name} replays from seq {first[1]} (stream sequence {first[0]}){note}"

    try:
        return io.run(work())
    finally:
        io.close()


def rewind_rabbitmq(url: str, spec: AnyLoaderSpec, stream: str, from_seq: int) -> str:
    """The group's stored offset moved back to the first message with `seq` >= `from_seq`."""
    bus = RabbitStreamBus(url, socket_timeout=30.0)
    try:
        newest = bus.newest(stream, 1)
        messages = bus.read_all(stream) if newest else []
    finally:
        bus.close()
    first = int(newest[0].entry_id) - len(messages) + 1 if newest else 0
    offset = next((first + i for i, m in enumerate(messages) if int(properties_of(m).get("seq", 0)) >= from_seq),
                  None)
    if offset is None:
        raise ReplayError(f"{stream} has no message with seq {from_seq} or later")
    seq = int(properties_of(messages[offset - first])["seq"])
    target = Target.parse(url)

    async def store() -> None:
        consumer = Consumer(target.host, target.port, username=target.username, password=target.password,
                            vhost=target.vhost, load_balancer_mode=target.load_balancer,
                            ssl_context=ssl.create_default_context() if target.tls else None)
        await consumer.start()
        try:
            await consumer.store_offset(stream, reference(spec.group_name), offset)
        finally:
            await consumer.close()

    try:
        asyncio.run(store())
    except FAILURES as exc:
        raise translate(exc, target) from exc
    note = f" (the stream starts at seq {seq}: older messages are gone)" if seq > from_seq and offset == first else ""
    return f"group {spec.group_name} replays from seq {seq} (offset {offset}){note}"
