"""RabbitMQ Streams: a straw stream is a RabbitMQ stream, written with the stream protocol (rstream).

Exactly once rests on two things the broker gives, and one it does not:

- Deduplication: each outbox publishes as a named producer, `straw.<outbox identity>` (the broker keeps
  producer names per stream, so the pair is this outbox's producer on that stream), and each message's
  `publishing_id` is the record's outbox `seq`. The stream's writer drops a message whose id is not above
  the last one it kept for that name, atomically: a resent batch (a lost confirm, a crash between the
  publish and the outbox's mark, a copy of the outbox file) never appears twice.
- The checkpoint is the stream's tail: every message carries, as AMQP application properties, its `seq`,
  `pos`, `source`, the `outbox` that wrote it and `positions` (each source's position as of that message,
  JSON). Reading the last message is reading the checkpoint; nothing is kept beside the stream.
- RabbitMQ has no compare-and-set. `publish` reads the tail and publishes only if it is still what the
  relay saw; between that read and the write (one round trip) another outbox, under another producer name,
  can append. What this guarantees is written out in the README ("RabbitMQ Streams: what is guaranteed").

rstream is asyncio; straw's relay is threads. Each bus runs one private event loop in a daemon thread and
every call waits for its coroutine with the bus's timeout. Only rstream's protocol client is used (not its
Producer, whose background timers, automatic reconnects and sub-entry batching would hide what the relay
must see): a lost connection is a `BusDown`, and the relay opens a new bus.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

from rstream import AMQPMessage, OffsetType, OnClosedErrorInfo, amqp_decoder, exceptions
from rstream.client import Addr, Client, ClientPool
from rstream.schema import Deliver, Message, OffsetSpec, Publish, PublishConfirm, PublishError

from bus import amqp
from bus.seam import BusDown, BusRefused, Checkpoint, Outgoing, Published, positions_text

SCHEMES = ("rabbitmq-stream", "rabbitmq-stream+tls")
DEFAULT_PORTS = {"rabbitmq-stream": 5552, "rabbitmq-stream+tls": 5551}
CONTENT_TYPE = amqp.CONTENT_TYPE
PRODUCER_PREFIX = "straw."
# RabbitMQ's own limit on a stream (queue) name, in UTF-8 bytes; the stream protocol sends it as a short string.
# Before RabbitMQ 3.11 the stream protocol cannot say whether a stream is empty: a subscription at its last
# chunk just delivers nothing. Only a stream this outbox's producer never wrote to can be empty, and only
# there is silence for this long taken as "empty" (see `_tail`).
EMPTY_WAIT = 3.0
# A stream found empty that way stays "empty" this long for this bus, so the relay's checkpoint read and the
# publish right after it do not wait twice; it widens the unfenced window of the README by as much.
EMPTY_FRESH = 2.0
# `length`, `newest` (straw status, straw stream, tests) decide nothing: they need not wait as long.
READ_EMPTY_WAIT = 0.5
# What we offer in the handshake; the broker's `stream.frame_max` (1 MiB by default) is the lower, and so the
# limit of one message (a larger record is refused with that advice, see `_publish`).
CLIENT_FRAME_MAX = 64 * 1024 * 1024
# Subscriptions per reading connection before it is replaced (see `_reader`).
READER_SUBSCRIPTIONS = 50
# Frame space a Publish frame and each message take besides the message bytes (the stream protocol's layout).
FRAME_OVERHEAD, MESSAGE_OVERHEAD = 13, 12

T = TypeVar("T")

# What a broker or a network can throw at a call; `translate` sorts them into refused (final) and down (retried).
CANCEL_GRACE = 5.0  # seconds a timed-out call may take to stop before `LoopThread.run` gives up on it
FAILURES = (exceptions.ServerError, exceptions.ClientError, OSError, ConnectionError, TimeoutError, EOFError)


def producer_name(identity: str) -> str:
    """This outbox's producer name on every stream (the broker keeps producer names per stream)."""
    return PRODUCER_PREFIX + identity


@dataclass(frozen=True)
class Target:
    """What a `rabbitmq-stream://user:password@host:port/vhost` URL says."""

    host: str
    port: int
    vhost: str
    username: str
    password: str = field(repr=False)  # never in a log line or a traceback's locals
    tls: bool = False
    load_balancer: bool = False

    @classmethod
    def parse(cls, url: str) -> Target:
        parts = urlsplit(url)
        if parts.scheme not in SCHEMES:
            raise ValueError(f"not a RabbitMQ stream URL: {parts.scheme}://")
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or DEFAULT_PORTS[parts.scheme],
            vhost=unquote(path) or "/",
            username=unquote(parts.username or "guest"),
            password=unquote(parts.password or "guest"),
            tls=parts.scheme.endswith("+tls"),
            load_balancer=query.get("load_balancer", "").lower() in ("1", "true", "yes"),
        )


@dataclass
class _Writer:
    """One stream's connection and this outbox's producer on it."""

    client: Client
    publisher_id: int
    reference: str
    confirmed: set[int] = field(default_factory=set)
    failed: dict[int, int] = field(default_factory=dict)  # publishing id -> broker response code
    news: asyncio.Event = field(default_factory=asyncio.Event)


class LoopThread:
    """A private asyncio loop in a daemon thread; `run` waits for one coroutine from any thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="straw-rabbitmq", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        future = asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, timeout), self.loop)
        try:
            # wait_for returns only once the call it cancelled has stopped, and a call inside rstream that swallows
            # the cancellation never does: a restarted loader waited on a subscription for minutes. A bounded
            # wait here turns that into a timeout (BusDown, a fresh connection), whatever the call does.
            return future.result(timeout + CANCEL_GRACE)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"no answer within {timeout:.0f} s (the call did not stop when cancelled)") from None

    def stop(self) -> None:
        async def cancel_the_rest() -> None:  # rstream's listeners and heartbeats, so nothing is left pending
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self.run(cancel_the_rest(), 5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        if not self.thread.is_alive():
            self.loop.close()


def translate(exc: BaseException, target: Target) -> BusDown | BusRefused:
    """rstream's and the socket's errors as the seam's: credentials and permissions are final."""
    where = f"{target.host}:{target.port}"
    if isinstance(exc, exceptions.AuthenticationFailure | exceptions.SASLAuthenticationFailureLoopback):
        return BusRefused(f"RabbitMQ at {where} refused the login of user {target.username!r} "
                          "(authentication failed): check the user and password in bus.url")
    if isinstance(exc, exceptions.VirtualHostAccessFailure):
        return BusRefused(f"RabbitMQ at {where}: user {target.username!r} may not use virtual host "
                          f"{target.vhost!r}: grant it (rabbitmqctl set_permissions -p VHOST USER ...) or fix bus.url")
    if isinstance(exc, exceptions.AccessRefused):
        return BusRefused(f"RabbitMQ at {where}: user {target.username!r} may not create, write or read this "
                          "stream: grant configure, write and read permissions on the stream names")
    if isinstance(exc, exceptions.SASLMechanismNotSupported):
        return BusRefused(f"RabbitMQ at {where} does not offer PLAIN login on its stream port")
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return BusDown(f"rabbitmq at {where} timed out")
    if isinstance(exc, exceptions.ServerError):  # e.g. StreamNotAvailable while a restarted node recovers
        return BusDown(f"rabbitmq at {where} answered {type(exc).__name__} {' '.join(str(exc).split())}".rstrip())
    detail = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, ConnectionRefusedError):
        return BusDown(f"rabbitmq unreachable at {where} (connection refused; is the stream plugin enabled? "
                       "rabbitmq-plugins enable rabbitmq_stream)")
    return BusDown(f"rabbitmq unreachable at {where} ({type(exc).__name__}: {detail})")


class RabbitStreamBus:
    """The `Bus` on RabbitMQ Streams (RabbitMQ 3.9 or newer with the `rabbitmq_stream` plugin)."""

    def __init__(self, url: str, *, socket_timeout: float = 10.0) -> None:
        self.target = Target.parse(url)
        self.url = url
        self.timeout = socket_timeout
        self._loop: LoopThread | None = None
        self._pool: ClientPool | None = None
        self._locator: Client | None = None
        self._writers: dict[str, _Writer] = {}
        self._created: set[str] = set()  # streams this bus created, so known empty until it writes
        self._empty_at: dict[str, float] = {}  # stream -> when a tail read last found it empty (monotonic)
        self._ids = 0  # subscription and publisher ids (one byte each, per connection)
        self._readers: dict[Addr, tuple[Client, int]] = {}  # per node: a reading connection and its subscriptions
        self._closing: set[asyncio.Future[None]] = set()

    # --- plumbing -------------------------------------------------------------------------------------------

    def _call(self, make: Callable[[], Awaitable[T]], timeout: float | None = None) -> T:
        if self._loop is None:
            self._loop = LoopThread()

        async def call() -> T:
            return await make()

        try:
            return self._loop.run(call(), timeout or self.timeout)
        except (BusDown, BusRefused):
            raise
        except FAILURES as exc:
            self._forget()
            raise translate(exc, self.target) from exc

    def _forget(self) -> None:
        """After a failure the connections may be half dead: the next call starts afresh."""
        if self._loop is not None:
            with contextlib.suppress(Exception):  # closing a dead connection may fail in any way
                self._loop.run(self._close_connections(), 10)

    async def _close_connections(self) -> None:
        self._writers.clear()
        self._created.clear()
        self._empty_at.clear()
        self._locator = None
        clients = [client for client, _ in self._readers.values()]
        self._readers.clear()
        pool, self._pool = self._pool, None
        for client in clients:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close(), 3)
        if pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pool.close(), 5)

    def _next_id(self) -> int:
        self._ids = (self._ids + 1) % 256
        return self._ids

    async def _client(self) -> Client:
        if self._locator is None or not self._locator.is_connection_alive():
            await self._close_connections()
            t = self.target
            context = ssl.create_default_context() if t.tls else None
            self._pool = ClientPool(t.host, t.port, ssl_context=context, vhost=t.vhost, username=t.username,
                                    password=t.password, frame_max=CLIENT_FRAME_MAX, heartbeat=60,
                                    load_balancer_mode=t.load_balancer, max_retries=20)
            self._locator = await self._pool.get(connection_name="straw", connection_closed_handler=_closed)
        return self._locator

    async def _leader(self, stream: str) -> Client:
        """A connection to the node that leads `stream` (writes go there; on one node, the same connection)."""
        client = await self._client()
        leader, _ = await client.query_leader_and_replicas(stream)
        props = client.server_properties or {}
        if (props.get("advertised_host"), props.get("advertised_port")) == (leader.host, str(leader.port)):
            return client
        assert self._pool is not None
        return await self._pool.get(connection_name="straw", addr=Addr(leader.host, leader.port), stream=stream,
                                    connection_closed_handler=_closed)

    async def _reader(self, stream: str) -> Client:
        """A connection to read `stream` on, replaced every READER_SUBSCRIPTIONS subscriptions: RabbitMQ 3.10
        keeps a file open per subscription until its connection closes (measured: one descriptor each, out of
        the broker's 1024 by default), so a reader that re-reads the tail before each batch must not live long."""
        client = await self._client()
        leader, _ = await client.query_leader_and_replicas(stream)
        addr = Addr(leader.host, leader.port)
        props = client.server_properties or {}
        if (props.get("advertised_host"), props.get("advertised_port")) == (leader.host, str(leader.port)):
            addr = Addr(self.target.host, self.target.port)  # the node we reached: keep the URL's address
        reader = self._readers.get(addr)
        if reader is not None and (reader[1] >= READER_SUBSCRIPTIONS or not reader[0].is_connection_alive()):
            del self._readers[addr]
            closing = asyncio.ensure_future(reader[0].close())  # closing waits 0.2 s; nothing waits for it
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)
            reader = None
        if reader is None:
            assert self._pool is not None
            opened = await self._pool.new(connection_name="straw-reader", addr=addr, connection_closed_handler=_closed)
            reader = (opened, 0)
        self._readers[addr] = (reader[0], reader[1] + 1)
        return reader[0]

    async def _exists(self, stream: str) -> bool:
        return await (await self._client()).stream_exists(stream)

    async def _deliveries(self, stream: str, spec: OffsetSpec, until: Callable[[int, list[bytes]], bool],
                          wait: float | None) -> bool:
        """Subscribe to `stream` at `spec`, hand each chunk (first offset, messages) to `until` until it says
        stop; False if nothing came within `wait` seconds (None: the call's own timeout)."""
        client = await self._reader(stream)
        sub = self._next_id()
        chunks: asyncio.Queue[Deliver] = asyncio.Queue()

        def on_deliver(frame: Deliver) -> None:
            if frame.subscription_id == sub:
                chunks.put_nowait(frame)

        client.add_handler(Deliver, on_deliver, name=str(sub))
        await client.run_queue_listener_task(sub, on_deliver)
        await client.subscribe(stream, sub, offset_spec=spec, initial_credit=1)
        try:
            while True:
                try:
                    frame = await asyncio.wait_for(chunks.get(), wait) if wait is not None else await chunks.get()
                except TimeoutError:
                    return False
                if frame.chunk_type == 0 and until(frame.chunk_first_offset, frame.get_messages()):
                    return True
                await client.credit(sub, 1)
        finally:
            client.remove_handler(Deliver, str(sub))
            if client.is_connection_alive():  # a dead broker must not hold the call past its timeout here
                with contextlib.suppress(*FAILURES):
                    await asyncio.wait_for(client.unsubscribe(sub), 2.0)
            await client.stop_queue_listener_task(sub)

    async def _tail(self, stream: str, identity: str | None, *,
                    empty_wait: float = EMPTY_WAIT) -> tuple[int, AMQPMessage] | None:
        """The stream's last message and its offset, or None if the stream is empty or missing."""
        if stream in self._created:
            return None  # this bus created it and has not written to it yet
        seen_empty = self._empty_at.get(stream)
        if seen_empty is not None and time.monotonic() - seen_empty < EMPTY_FRESH:
            return None  # a wait just said so (the relay's checkpoint, then its publish): not twice
        if not await self._exists(stream):
            return None
        # Silence means "empty" only where our own producer never wrote (see EMPTY_WAIT); where it did, the
        # stream holds messages and silence is a broker that does not answer (the call times out: BusDown).
        written = 0
        if identity is not None:
            written = await (await self._client()).query_publisher_sequence(stream, producer_name(identity))
        wait = None if written > 0 else empty_wait
        found: list[tuple[int, bytes]] = []

        def take(first: int, messages: list[bytes]) -> bool:
            if messages:
                found[:] = [(first + len(messages) - 1, messages[-1])]
            return True

        if not await self._deliveries(stream, OffsetSpec(OffsetType.LAST), take, wait) or not found:
            if empty_wait >= EMPTY_WAIT:
                self._empty_at[stream] = time.monotonic()
            return None
        self._empty_at.pop(stream, None)
        offset, raw = found[0]
        return offset, amqp_decoder(raw)

    async def _writer(self, stream: str, identity: str) -> _Writer:
        writer = self._writers.get(stream)
        if writer is not None and writer.client.is_connection_alive():
            return writer
        client = await self._client()
        if not await client.stream_exists(stream):
            try:
                await client.create_stream(stream)
                self._created.add(stream)
            except exceptions.StreamAlreadyExists:
                pass  # another process created it between our look and our create
        client = await self._leader(stream)
        writer = _Writer(client, self._next_id(), producer_name(identity))
        await client.declare_publisher(stream, writer.reference, writer.publisher_id)

        def on_confirm(frame: PublishConfirm) -> None:
            if frame.publisher_id == writer.publisher_id:
                writer.confirmed.update(frame.publishing_ids)
                writer.news.set()

        def on_error(frame: PublishError) -> None:
            if frame.publisher_id == writer.publisher_id:
                writer.failed.update((e.publishing_id, e.response_code) for e in frame.errors)
                writer.news.set()

        client.add_handler(PublishConfirm, on_confirm, name=f"confirm{writer.publisher_id}")
        client.add_handler(PublishError, on_error, name=f"error{writer.publisher_id}")
        self._writers[stream] = writer
        return writer

    # --- the seam ---------------------------------------------------------------------------------------------

    def checkpoint(self, stream: str) -> Checkpoint:
        return self._call(lambda: self._checkpoint(stream, None))

    async def _checkpoint(self, stream: str, identity: str | None) -> Checkpoint:
        tail = await self._tail(stream, identity)
        return Checkpoint() if tail is None else checkpoint_of(tail[1])

    def publish(self, stream: str, seen: Checkpoint, batch: Sequence[Outgoing], identity: str) -> Checkpoint | None:
        return self._call(lambda: self._publish(stream, seen, batch, identity))

    async def _publish(self, stream: str, seen: Checkpoint, batch: Sequence[Outgoing],
                       identity: str) -> Checkpoint | None:
        writer = await self._writer(stream, identity)
        now = await self._checkpoint(stream, identity)
        if (now.seq, now.outbox) != (seen.seq, seen.outbox):
            return None
        positions = dict(now.positions)
        messages = []
        for seq, source, position, event in batch:
            positions[source] = position
            data = amqp.encode(seq, position, source, identity, positions_text(positions), event)
            messages.append(Message(publishing_id=seq, filter_value=None, data=data))
        writer.confirmed.clear()
        writer.failed.clear()
        writer.news.clear()
        # No sub-entry batching (it can duplicate even with deduplication): plain messages, as many per
        # frame as the negotiated frame size takes.
        frame: list[Message] = []
        size = FRAME_OVERHEAD
        limit = writer.client.frame_max
        for message in messages:
            if FRAME_OVERHEAD + MESSAGE_OVERHEAD + len(message.data) > limit:
                # The broker would close the connection on every try: waiting cannot help, the operator can.
                raise BusRefused(
                    f"record seq {message.publishing_id} is {len(message.data):,} bytes as a message, more than "
                    f"RabbitMQ's stream frame size ({limit:,} bytes): raise stream.frame_max on the broker "
                    "(and nothing else changes), or make the source's rows smaller"
                )
            if frame and size + MESSAGE_OVERHEAD + len(message.data) > writer.client.frame_max:
                await writer.client.send_publish_frame(Publish(publisher_id=writer.publisher_id, messages=frame))
                frame, size = [], FRAME_OVERHEAD
            frame.append(message)
            size += MESSAGE_OVERHEAD + len(message.data)
        await writer.client.send_publish_frame(Publish(publisher_id=writer.publisher_id, messages=frame))
        wanted = {m.publishing_id for m in messages}
        while not wanted <= writer.confirmed | writer.failed.keys():
            if not writer.client.is_connection_alive():
                raise BusDown(f"rabbitmq connection to {self.target.host}:{self.target.port} lost mid-publish")
            writer.news.clear()
            try:
                await asyncio.wait_for(writer.news.wait(), 0.5)
            except TimeoutError:
                continue
        if writer.failed:
            code = next(iter(writer.failed.values()))
            exc = exceptions.ServerError.from_code(code)(f"publish refused, code {code}")
            raise exc
        self._created.discard(stream)
        self._empty_at.pop(stream, None)
        return Checkpoint(batch[-1].seq, identity, positions)

    def describe(self) -> tuple[bool, str]:
        props = self._call(self._describe)
        version = props.get("version", "?")
        major_minor = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
        ok = len(major_minor) == 2 and major_minor >= (3, 9)
        return ok, f"RabbitMQ {version} (streams)" + ("" if ok else "; deduplication needs RabbitMQ 3.9 or newer")

    async def _describe(self) -> dict[str, str]:
        return dict((await self._client()).server_properties or {})

    def length(self, stream: str) -> int:
        return self._call(lambda: self._length(stream))

    async def _length(self, stream: str) -> int:
        tail = await self._tail(stream, None, empty_wait=READ_EMPTY_WAIT)
        if tail is None:
            return 0
        first: list[int] = []

        def take(offset: int, _messages: list[bytes]) -> bool:
            first.append(offset)
            return True

        await self._deliveries(stream, OffsetSpec(OffsetType.FIRST), take, None)
        return tail[0] - first[0] + 1

    def newest(self, stream: str, count: int) -> list[Published]:
        return self._call(lambda: self._newest(stream, count))

    async def _newest(self, stream: str, count: int) -> list[Published]:
        tail = await self._tail(stream, None, empty_wait=READ_EMPTY_WAIT)
        if tail is None or count <= 0:
            return []
        last = tail[0]
        start = max(0, last - count + 1)
        found: list[Published] = []

        def take(first: int, messages: list[bytes]) -> bool:
            for offset, raw in enumerate(messages, first):
                if start <= offset <= last:
                    message = amqp_decoder(raw)
                    found.append(Published(str(offset), int(properties_of(message)["seq"]), body_of(message)))
            return first + len(messages) > last

        await self._deliveries(stream, OffsetSpec.from_params(OffsetType.OFFSET, start), take, None)
        return found

    def close(self) -> None:
        if self._loop is None:
            return
        self._forget()
        self._loop.stop()
        self._loop = None

    # --- for tests and operators ------------------------------------------------------------------------------

    def last_publishing_id(self, stream: str, identity: str) -> int:
        """The broker's last kept publishing id (outbox seq) of the outbox `identity` on `stream`; 0 if none."""

        async def query() -> int:
            client = await self._client()
            if not await client.stream_exists(stream):
                return 0
            return await client.query_publisher_sequence(stream, producer_name(identity))

        return self._call(query)

    def delete_stream(self, stream: str) -> None:
        """Delete `stream` if it exists (tests clean up with this; straw itself never deletes a stream)."""

        async def delete() -> None:
            client = await self._client()
            with contextlib.suppress(exceptions.StreamDoesNotExist):
                await client.delete_stream(stream)

        self._writers.pop(stream, None)
        self._call(delete)

    def read_all(self, stream: str) -> list[AMQPMessage]:
        """Every message of `stream`, oldest first (tests and `straw stream` verification)."""
        return self._call(lambda: self._read_all(stream), timeout=max(self.timeout, 60.0))

    async def _read_all(self, stream: str) -> list[AMQPMessage]:
        tail = await self._tail(stream, None, empty_wait=READ_EMPTY_WAIT)
        if tail is None:
            return []
        last = tail[0]
        found: list[AMQPMessage] = []

        def take(first: int, messages: list[bytes]) -> bool:
            found.extend(amqp_decoder(raw) for raw in messages)
            return first + len(messages) > last

        await self._deliveries(stream, OffsetSpec(OffsetType.FIRST), take, None)
        return found


async def _closed(_info: OnClosedErrorInfo) -> None:
    """A lost connection shows as the next call's BusDown; without a handler rstream logs a traceback."""


def properties_of(message: AMQPMessage) -> dict[str, Any]:
    """A message's application properties with text keys and values (the AMQP decoder gives bytes)."""
    raw: dict[Any, Any] = message.application_properties or {}
    return {_text(k): _text(v) for k, v in raw.items()}


def body_of(message: AMQPMessage) -> bytes:
    """The message's data section: one CloudEvent, structured JSON."""
    body = message.body
    if body is None:  # an empty data section decodes as no body
        return b""
    if isinstance(body, list):  # the decoder gives the data sections as a list
        return b"".join(bytes(part) for part in body)
    return bytes(body)


def checkpoint_of(message: AMQPMessage) -> Checkpoint:
    props = properties_of(message)
    return Checkpoint(int(props["seq"]), str(props["outbox"]), json.loads(props["positions"]))


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value
