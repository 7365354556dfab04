"""The consumer seam on RabbitMQ Streams: an rstream consumer per stream, its offset tracked by the broker.

A loader group is, per stream, the offset reference `straw-loader.<group>`: it holds the next offset to read
(the first record not settled), stored with `store_offset` only after the batch below it is applied and
acked, so a crash at any moment re-reads from the last settled record, and the target skips what it has
(idempotent apply). A stream has no per-message acks: a record that failed stays in this process's hands and
is handed out again after `claim_idle` while the records behind it go on; the stored offset does not pass it
until it is applied or dead-lettered (to the RabbitMQ stream `<dead_letter_stream>`, default
`<stream>.dlq`). The broker keeps no delivery count on a stream: the count is this process's, so a record
that kills the loader itself each time is not counted across restarts (README, Loaders).

RabbitMQ 3.10 (this machine's) has no single active consumer on streams (3.11 and newer): two processes of
one group each read every record. That is safe (the apply is idempotent and a stored offset moving back only
re-reads) but doubles the work, so run one loader process per group on RabbitMQ.

rstream is asyncio: as in bus/rabbitmq.py the consumer runs a private loop in a daemon thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ssl
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from rstream import (
    AMQPMessage,
    Consumer,
    ConsumerOffsetSpecification,
    MessageContext,
    OffsetType,
    OnClosedErrorInfo,
    Producer,
    Properties,
    amqp_decoder,
    exceptions,
)

from bus.rabbitmq import CONTENT_TYPE, FAILURES, LoopThread, RabbitStreamBus, Target, body_of, properties_of, translate
from loaders.consumer import BusDown, BusRefused
from loaders.records import Delivery

T = TypeVar("T")

REFERENCE_PREFIX = "straw-loader."
_QUEUE_LIMIT = 2  # chunks waiting in memory per stream before the broker is made to wait (back pressure)


def reference(group: str) -> str:
    """The group's offset reference on each of its streams (RabbitMQ keeps references per stream)."""
    return REFERENCE_PREFIX + group


def delivery_of(stream: str, offset: int, message: AMQPMessage, deliveries: int) -> Delivery:
    try:
        props = properties_of(message)
        fields: dict[str, str] = {"event": body_of(message).decode("utf-8", "replace")}
        fields.update((k, str(props[k])) for k in ("seq", "pos") if k in props)
    except Exception:  # not straw's message (another producer): the SDK dead-letters it as a bad record
        fields = {}
    return Delivery(stream, str(offset), fields, deliveries)


class RabbitConsumer:
    def __init__(
        self,
        url: str,
        streams: Sequence[str],
        group: str,
        consumer: str,
        *,
        claim_idle: float,
        dead_letters: Callable[[str], str],
        start: str = "begin",
        timeout: float = 10.0,
    ) -> None:
        self._target = Target.parse(url)
        self._url = url
        self._timeout = timeout
        self._streams = list(streams)
        self._group = group
        self._reference = reference(group)
        self._name = consumer
        self._claim_idle = claim_idle
        self._dead_letters = dead_letters
        self._start = start
        self._loop = LoopThread()
        self._consumer: Consumer | None = None
        self._producer: Producer | None = None
        self._lost = False
        self._queues: dict[str, asyncio.Queue[tuple[int, AMQPMessage]]] = {}
        self._read_to: dict[str, int] = {}  # next offset after the last one handed out
        self._stored: dict[str, int] = {}  # what the broker holds for the reference
        self._out: dict[tuple[str, int], tuple[Delivery, float]] = {}  # handed out, not settled: when, how often
        self._tails: RabbitStreamBus | None = None

    @property
    def name(self) -> str:
        return self._name

    # --- plumbing -------------------------------------------------------------------------------------------

    def _run(self, make: Callable[[], Coroutine[Any, Any, T]], timeout: float | None = None) -> T:
        if self._lost:  # the connection closed under us: start afresh from the stored offsets, after a wait
            self._drop()
            raise BusDown(f"rabbitmq connection to {self._target.host}:{self._target.port} lost")
        try:
            return self._loop.run(make(), timeout or self._timeout)
        except (BusDown, BusRefused):
            raise
        except FAILURES as exc:
            self._drop()
            raise translate(exc, self._target) from exc

    async def _on_closed(self, _info: OnClosedErrorInfo) -> None:
        self._lost = True

    def _drop(self) -> None:
        """After a failure the connection may be half dead: the next call starts afresh from the stored offsets."""
        async def close() -> None:
            consumer, self._consumer = self._consumer, None
            producer, self._producer = self._producer, None
            for closing in (consumer, producer):
                if closing is not None:
                    with contextlib.suppress(Exception):  # closing a dead connection fails in many ways
                        await asyncio.wait_for(closing.close(), 5)

        with contextlib.suppress(Exception):  # the loop may be stuck on a dead socket: start afresh anyway
            self._loop.run(close(), 10)
        self._queues.clear()
        self._out.clear()
        self._read_to.clear()
        self._stored.clear()
        self._lost = False

    async def _open(self) -> Consumer:
        if self._consumer is not None:
            return self._consumer
        t = self._target
        consumer = Consumer(t.host, t.port, username=t.username, password=t.password, vhost=t.vhost,
                            ssl_context=ssl.create_default_context() if t.tls else None,
                            load_balancer_mode=t.load_balancer, on_close_handler=self._on_closed,
                            connection_name=f"straw-loader-{self._name}")
        await consumer.start()
        self._consumer = consumer
        for stream in self._streams:
            if not await consumer.stream_exists(stream):
                raise BusDown(f"RabbitMQ stream {stream!r} does not exist yet (the relay creates it at its first "
                              "publish)")
            try:
                stored = await consumer.query_offset(stream, self._reference)
                spec = ConsumerOffsetSpecification(OffsetType.OFFSET, stored)
                self._stored[stream] = stored
            except exceptions.OffsetNotFound:
                spec = ConsumerOffsetSpecification(OffsetType.FIRST if self._start == "begin" else OffsetType.NEXT)
            queue: asyncio.Queue[tuple[int, AMQPMessage]] = asyncio.Queue(maxsize=_QUEUE_LIMIT * 4000)
            self._queues[stream] = queue

            async def take(message: AMQPMessage, context: MessageContext,
                           queue: asyncio.Queue[tuple[int, AMQPMessage]] = queue) -> None:
                await queue.put((context.offset, message))  # waits when full: the broker waits with it

            await consumer.subscribe(stream, take, decoder=amqp_decoder, offset_specification=spec,
                                     initial_credit=_QUEUE_LIMIT)
        return consumer

    # --- the seam ---------------------------------------------------------------------------------------------

    def read(self, count: int, block: float) -> list[Delivery]:
        return self._run(lambda: self._read(count, block), self._timeout + block)

    async def _read(self, count: int, block: float) -> list[Delivery]:
        await self._open()
        now = time.monotonic()
        again = [d for d, since in self._out.values() if now - since >= self._claim_idle][:count]
        if again:  # failed here before, or handed out and never settled: their turn again, counted
            found = []
            for old in again:
                delivery = Delivery(old.stream, old.entry_id, old.fields, old.deliveries + 1)
                self._out[(old.stream, int(old.entry_id))] = (delivery, now)
                found.append(delivery)
            return found
        found = self._ready(count, now)
        if found or block <= 0:
            return found
        waits = {asyncio.ensure_future(q.get()): s for s, q in self._queues.items()}
        done, waiting = await asyncio.wait(waits, timeout=block, return_when=asyncio.FIRST_COMPLETED)
        for future in waiting:
            future.cancel()
        for future in done:
            found.append(self._hand_out(waits[future], *future.result(), now))
        return found + self._ready(count - len(found), now)

    def _ready(self, count: int, now: float) -> list[Delivery]:
        """What the subscriptions delivered already, up to `count`."""
        found: list[Delivery] = []
        for stream, queue in self._queues.items():
            while len(found) < count and not queue.empty():
                found.append(self._hand_out(stream, *queue.get_nowait(), now))
        return found

    def _hand_out(self, stream: str, offset: int, message: AMQPMessage, now: float) -> Delivery:
        delivery = delivery_of(stream, offset, message, 1)
        self._out[(stream, offset)] = (delivery, now)
        self._read_to[stream] = offset + 1
        return delivery

    def pending(self) -> int:
        """Unsettled records in hand plus records on the streams not read yet (the tails say how many)."""
        ahead = 0
        for stream in self._streams:
            newest = self._tail_bus().newest(stream, 1)
            if newest:
                ahead += max(0, int(newest[0].entry_id) + 1 - self._read_to.get(stream, self._stored.get(stream, 0)))
        return len(self._out) + ahead

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        self._run(lambda: self._settle(deliveries))

    async def _settle(self, deliveries: Sequence[Delivery]) -> None:
        for delivery in deliveries:
            self._out.pop((delivery.stream, int(delivery.entry_id)), None)
        consumer = await self._open()
        for stream in {d.stream for d in deliveries}:
            held = [offset for (s, offset) in self._out if s == stream]
            settled = min(held) if held else self._read_to.get(stream, 0)
            if settled > self._stored.get(stream, -1):
                await consumer.store_offset(stream, self._reference, settled)
                self._stored[stream] = settled

    def dead_letter(self, delivery: Delivery, error: str) -> None:
        async def work() -> None:
            producer = await self._dead_letter_producer()
            dlq = self._dead_letters(delivery.stream)
            await producer.create_stream(dlq, exists_ok=True)
            props = {k: v for k, v in delivery.fields.items() if k != "event"}
            props.update({"stream": delivery.stream, "entry": delivery.entry_id, "group": self._group,
                          "consumer": self._name, "deliveries": str(delivery.deliveries), "error": error[:4000],
                          "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")})
            message = AMQPMessage(body=delivery.fields.get("event", "").encode(),
                                  properties=Properties(content_type=CONTENT_TYPE), application_properties=props)
            await producer.send_wait(dlq, message)  # confirmed before the offset passes the record
            await self._settle([delivery])

        self._run(work)

    async def _dead_letter_producer(self) -> Producer:
        if self._producer is None:
            t = self._target
            self._producer = Producer(t.host, t.port, username=t.username, password=t.password, vhost=t.vhost,
                                      ssl_context=ssl.create_default_context() if t.tls else None,
                                      load_balancer_mode=t.load_balancer, connection_name="straw-loader-dlq")
            await self._producer.start()
        return self._producer

    def _tail_bus(self) -> RabbitStreamBus:
        if self._tails is None:
            self._tails = RabbitStreamBus(self._url, socket_timeout=self._timeout)
        return self._tails

    def newest_seq(self, stream: str) -> int:
        newest = self._tail_bus().newest(stream, 1)
        return newest[0].seq if newest else 0

    def close(self) -> None:
        self._drop()
        if self._tails is not None:
            self._tails.close()
        self._loop.stop()
