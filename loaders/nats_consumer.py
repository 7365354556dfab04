"""The consumer seam on NATS JetStream: one durable pull consumer per (group, straw stream), explicit acks.

Each straw stream is a subject of the JetStream stream `bus.jetstream.stream` (bus/nats.py). A loader group
is, per subject, a durable consumer named after the group and the subject (`durable_name`), filtered on the
subject, `ack_policy: explicit`, `ack_wait` = the loader's `claim_idle` (an unacked message, whoever pulled
it, comes back after that long) and `max_deliver` = `max_deliveries` + 2: the SDK dead-letters a record at its
`max_deliveries`-th failed delivery, or unseen at the next one (a member died applying it each time); the
server's own limit is two above, a backstop that should never be reached (JetStream would then drop the
message from the consumer, with only an advisory). Several processes pulling one durable share its work.

Delivery counts are the server's (`num_delivered`), so they survive a crash of every member. A dead letter is
published to the subject `<dead_letter_stream>` (default `<stream>.dlq`) in the same JetStream stream, with
`Nats-Msg-Id` = group, stream and sequence (a crash between that publish and the ack does not store it twice
within the duplicate window), then acked and the ack confirmed.

A member that is its group's only one (`adopt`: a JSON Lines loader, which skips `seq`s already on disk and so
needs stream order) takes what a killed run or a lost connection had pulled before anything newer, at start and
after each reconnect, without waiting `claim_idle`: for a moment the durable's `max_ack_pending` is what is
pending (the server delivers nothing new, only redeliveries) and its `ack_wait` short (they are due at once);
then both are set back. Each such message counts one more delivery, as a redelivery would.

nats-py is asyncio; the loader is synchronous. As in bus/nats.py the consumer owns a private event loop that it
drives from the calling thread, and reconnects are its own (a lost connection is `BusDown`; the next call
opens a new one, and what the old one had pulled comes back after `ack_wait`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import re
import time
from collections.abc import Callable, Coroutine, Sequence
from contextlib import suppress
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, Header

from bus.names import JetStreamOptions
from bus.nats import CREATED_BY, SEQ, STREAM_NOT_FOUND, covers
from bus.nats_connect import connect_once
from loaders.consumer import BusDown, BusRefused
from loaders.records import Delivery

T = TypeVar("T")

SERVER_SLACK = 2  # max_deliver above max_deliveries: see the module's docstring
ADOPT_ACK_WAIT = 1.0  # the durable's ack_wait while a member adopts: what was pulled earlier is due by then
ADOPT_SLACK = 5.0  # and how much longer the member waits for it to come back (a loaded server)
log = structlog.get_logger("straw.loader")
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
# Headers of a dead letter (the event stays the body).
DLQ_HEADERS = ("Straw-Dlq-Stream", "Straw-Dlq-Entry", "Straw-Dlq-Group", "Straw-Dlq-Consumer",
               "Straw-Dlq-Deliveries", "Straw-Dlq-Error", "Straw-Dlq-At")


def durable_name(group: str, subject: str) -> str:
    """The group's durable consumer on `subject`: readable, and only characters JetStream takes in a name."""
    clean = _NAME_UNSAFE.sub("_", f"{group}_{subject}")
    if clean == f"{group}_{subject}" and len(clean) <= 200:
        return clean
    digest = hashlib.sha256(f"{group}\n{subject}".encode()).hexdigest()[:12]
    return f"{clean[:180]}_{digest}"


def header_text(value: str) -> str:
    """A header value NATS can carry: one line (an error text may hold CR/LF)."""
    return " ".join(value.split())[:4000]


def down(exc: BaseException) -> BusDown:
    detail = " ".join(str(exc).split()) or type(exc).__name__
    return BusDown(f"nats unreachable ({type(exc).__name__}: {detail})")


def consumer_config(group: str, subject: str, *, claim_idle: float, max_deliveries: int, start: str,
                    from_stream_seq: int | None = None) -> ConsumerConfig:
    """The group's durable consumer on `subject` (`from_stream_seq`: `straw replay` moved it there)."""
    policy = DeliverPolicy.ALL if start == "begin" else DeliverPolicy.NEW
    return ConsumerConfig(
        durable_name=durable_name(group, subject), filter_subject=subject,
        ack_policy=AckPolicy.EXPLICIT, ack_wait=claim_idle, max_deliver=max_deliveries + SERVER_SLACK,
        deliver_policy=policy if from_stream_seq is None else DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=from_stream_seq,
        max_ack_pending=-1,  # several members each hold a batch: no server cap beneath theirs
        description=f"straw loader group {group} on {subject}",
    )


class NatsLoop:
    """A private event loop driven from the calling thread, and one connection without automatic reconnects."""

    def __init__(self, url: str, timeout: float) -> None:
        self.url = url
        self.timeout = timeout
        self.loop = asyncio.new_event_loop()
        self.nc: Client | None = None
        self.js: JetStreamContext | None = None

    async def _noop(self, *_: Any) -> None:
        return None

    async def connect(self) -> JetStreamContext:
        if self.js is not None and self.nc is not None and self.nc.is_connected:
            return self.js
        await self.drop()
        self.nc = await connect_once(
            self.url, timeout=min(self.timeout, 5.0), error_cb=self._noop, disconnected_cb=self._noop,
            closed_cb=self._noop, reconnected_cb=self._noop, name="straw-loader",
        )
        self.js = self.nc.jetstream(timeout=self.timeout)
        return self.js

    async def drop(self) -> None:
        nc, self.nc, self.js = self.nc, None, None
        if nc is not None and not nc.is_closed:
            with suppress(Exception):  # closing a connection to a server that is gone fails in many ways
                await asyncio.wait_for(nc.close(), 2.0)

    def run(self, work: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """One call on the private loop, its errors as the seam's."""
        try:
            return self.loop.run_until_complete(asyncio.wait_for(work, (timeout or self.timeout) + 1.0))
        except (BusDown, BusRefused):
            raise
        except nats.errors.Error as exc:
            if isinstance(exc, nats.errors.AuthorizationError) or "authorization violation" in str(exc).lower():
                raise BusRefused(f"NATS authentication failed ({' '.join(str(exc).split())}): check the user and "
                                 "password (or token) in bus.url") from None
            self.loop.run_until_complete(self.drop())
            raise down(exc) from exc
        except (TimeoutError, OSError) as exc:
            self.loop.run_until_complete(self.drop())
            raise down(exc) from exc

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.run_until_complete(self.drop())
        leftover = asyncio.all_tasks(self.loop)
        for task in leftover:
            task.cancel()
        with suppress(Exception):
            self.loop.run_until_complete(asyncio.gather(*leftover, return_exceptions=True))
        self.loop.close()


async def ensure_subject(js: JetStreamContext, stream: str, subject: str) -> None:
    """The JetStream stream takes `subject` (a dead-letter subject): added if straw made the stream."""
    try:
        info = await js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        raise BusDown(f"JetStream stream {stream!r} does not exist yet (the relay creates it at its first "
                      "publish)") from None
    subjects = list(info.config.subjects or [])
    if any(covers(pattern, subject) for pattern in subjects):
        return
    if info.config.description != CREATED_BY:
        raise BusRefused(f"JetStream stream {stream!r} does not take the dead-letter subject {subject!r}; add it to "
                         "the stream's subjects, or set the loader's dead_letter_stream to a subject it takes")
    info.config.subjects = [*subjects, subject]
    await js.update_stream(info.config)


class NatsConsumer:
    def __init__(
        self,
        url: str,
        options: JetStreamOptions,
        streams: Sequence[str],
        group: str,
        consumer: str,
        *,
        claim_idle: float,
        max_deliveries: int,
        dead_letters: Callable[[str], str],
        start: str = "begin",
        timeout: float = 10.0,
        adopt: bool = False,
    ) -> None:
        """`adopt`: this member is its group's only one (see the module's docstring)."""
        self._io = NatsLoop(url, timeout)
        self._options = options
        self._streams = list(streams)
        self._group = group
        self._name = consumer
        self._claim_idle = claim_idle
        self._max_deliver = max_deliveries + SERVER_SLACK
        self._dead_letters = dead_letters
        self._start = start
        self._subs: dict[str, JetStreamContext.PullSubscription] = {}
        self._subs_on: Client | None = None  # the connection the subscriptions live on
        self._held: dict[tuple[str, str], Msg] = {}  # pulled and not acked yet, by (stream, entry id)
        self._adopt = adopt
        self._adopted: dict[str, list[Delivery]] = {}  # taken over at (re)connect, handed out before anything new
        self._next = 0  # round robin over the subjects

    @property
    def name(self) -> str:
        return self._name

    @property
    def _adopting(self) -> float:
        """How much longer a call that (re)subscribes may take: the wait for what is adopted."""
        return ADOPT_ACK_WAIT + ADOPT_SLACK if self._adopt else 0.0

    def _config(self, subject: str) -> ConsumerConfig:
        return consumer_config(self._group, subject, claim_idle=self._claim_idle,
                               max_deliveries=self._max_deliver - SERVER_SLACK, start=self._start)

    async def _subscriptions(self) -> dict[str, JetStreamContext.PullSubscription]:
        nc = self._io.nc
        if self._subs and nc is not None and nc is self._subs_on and nc.is_connected:
            return self._subs
        self._subs.clear()
        self._held.clear()  # pulled on a lost connection: they come back after ack_wait (or are adopted below)
        self._adopted.clear()
        js = await self._io.connect()
        self._subs_on = self._io.nc  # another call may have opened the connection: the subscriptions are new
        for subject in self._streams:
            try:
                self._subs[subject] = await js.pull_subscribe(
                    subject, durable=durable_name(self._group, subject), stream=self._options.stream,
                    config=self._config(subject))
            except nats.js.errors.NotFoundError as exc:
                if exc.err_code == STREAM_NOT_FOUND or "stream not found" in str(exc).lower():
                    raise BusDown(f"JetStream stream {self._options.stream!r} does not exist yet (the relay "
                                  "creates it at its first publish)") from None
                raise
        if self._adopt:
            found = await asyncio.gather(*(self._take_over(js, subject, sub) for subject, sub in self._subs.items()))
            self._adopted = dict(zip(self._subs, found, strict=True))
        return self._subs

    async def _take_over(self, js: JetStreamContext, subject: str,
                         sub: JetStreamContext.PullSubscription) -> list[Delivery]:
        """What the group has pending on `subject` (pulled by a run since killed, or on a lost connection),
        redelivered to this member now, in stream order; the durable's config as this loader's after."""
        stream, durable = self._options.stream, durable_name(self._group, subject)
        info = await js.consumer_info(stream, durable)
        held = int(info.num_ack_pending or 0)
        config = info.config
        if held:
            await js.add_consumer(stream, config=config.evolve(ack_wait=ADOPT_ACK_WAIT, max_ack_pending=held))
        got: dict[int, Msg] = {}
        try:
            deadline = time.monotonic() + ADOPT_ACK_WAIT + ADOPT_SLACK
            while len(got) < held and (left := deadline - time.monotonic()) > 0:
                try:
                    msgs = await sub.fetch(held - len(got), timeout=min(left, 1.0))
                except (nats.errors.TimeoutError, TimeoutError):
                    continue
                for msg in msgs:
                    got[msg.metadata.sequence.stream] = msg  # a second redelivery replaces the first
                    await msg.in_progress()  # not due again while the others come back
        finally:
            if held or abs((config.ack_wait or 0) - self._claim_idle) > 1e-3 or config.max_ack_pending != -1:
                # back to this loader's: also after a run killed while adopting, or a changed claim_idle
                await js.add_consumer(stream, config=config.evolve(ack_wait=self._claim_idle, max_ack_pending=-1))
        if len(got) < held:  # newer entries must not go first: a target that skips by seq would lose these
            await self._io.drop()  # what this member pulled is pending again: the next call adopts it all anew
            raise BusDown(f"{held - len(got)} of the {held} entries pending on {subject!r} did not come back "
                          f"within {ADOPT_ACK_WAIT + ADOPT_SLACK:g}s")
        if held:
            log.info("took over the entries an earlier run had pulled", stream=subject, entries=held)
        return [self._delivery(subject, msg) for _, msg in sorted(got.items())]

    def read(self, count: int, block: float) -> list[Delivery]:
        return self._io.run(self._read(count, block), timeout=self._io.timeout + block + self._adopting)

    async def _read(self, count: int, block: float) -> list[Delivery]:
        subs = await self._subscriptions()
        order = self._streams[self._next:] + self._streams[:self._next]
        self._next = (self._next + 1) % len(self._streams)
        for subject in order:
            if adopted := self._adopted.get(subject):
                self._adopted[subject] = adopted[count:]
                return adopted[:count]
        for index, subject in enumerate(order):
            # Only the last subject waits the whole `block`: the others are asked and answered at once.
            wait = max(block, 0.05) if index == len(order) - 1 else 0.05
            try:
                msgs = await subs[subject].fetch(count, timeout=wait)
            except (nats.errors.TimeoutError, TimeoutError):
                continue
            found = [self._delivery(subject, msg) for msg in msgs if msg.metadata.sequence.stream]
            if found:
                return found
        return []

    def _delivery(self, subject: str, msg: Msg) -> Delivery:
        meta = msg.metadata
        entry = str(meta.sequence.stream)
        self._held[(subject, entry)] = msg
        headers = msg.headers or {}
        fields = {"event": msg.data.decode("utf-8", "replace"), "seq": headers.get(SEQ, ""), "pos": ""}
        return Delivery(subject, entry, fields, int(meta.num_delivered))

    def pending(self) -> int:
        async def work() -> int:
            subs = await self._subscriptions()
            total = 0
            for sub in subs.values():
                info = await sub.consumer_info()
                total += int(info.num_ack_pending or 0) + int(info.num_pending or 0)
            return total

        return self._io.run(work(), timeout=self._io.timeout + self._adopting)

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        async def work() -> None:
            nc = self._io.nc
            if nc is None or not nc.is_connected:  # pulled on a lost connection: the records come back
                raise BusDown("nats connection lost before the ack")
            if nc is not self._subs_on:  # pulled on a connection since lost: the records come back
                raise BusDown("nats connection lost before the ack")
            for delivery in deliveries:
                msg = self._held.pop((delivery.stream, delivery.entry_id), None)
                if msg is not None:
                    await msg.ack()
            await nc.flush()  # the acks are on the server before the call returns (SIGTERM, then exit)

        self._io.run(work())

    def dead_letter(self, delivery: Delivery, error: str) -> None:
        async def work() -> None:
            js = await self._io.connect()
            subject = self._dead_letters(delivery.stream)
            await ensure_subject(js, self._options.stream, subject)
            values = (delivery.stream, delivery.entry_id, self._group, self._name, str(delivery.deliveries),
                      header_text(error), dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
            headers = {SEQ: delivery.fields.get("seq", ""), **dict(zip(DLQ_HEADERS, values, strict=True)),
                       Header.MSG_ID.value: f"dlq:{self._group}:{delivery.stream}:{delivery.entry_id}"}
            await js.publish(subject, delivery.fields.get("event", "").encode(), stream=self._options.stream,
                             headers=headers)
            msg = self._held.pop((delivery.stream, delivery.entry_id), None)
            if msg is not None:
                await msg.ack_sync(timeout=self._io.timeout)

        self._io.run(work())

    def newest_seq(self, stream: str) -> int:
        async def work() -> int:
            js = await self._io.connect()
            try:
                msg = await js.get_last_msg(self._options.stream, stream)
            except nats.js.errors.NotFoundError:
                return 0
            return int((msg.headers or {}).get(SEQ, 0) or 0)

        return self._io.run(work())

    def close(self) -> None:
        self._io.close()
