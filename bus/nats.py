"""NATS JetStream: each straw stream is a subject of one JetStream stream.

The checkpoint is the subject's last message: its `Straw-Seq`, `Straw-Outbox` and
`Straw-Positions` headers say where the relay stands (read with a stream
message get, never by resending). A batch is published pipelined (all messages
sent, then all acks awaited), fenced per message:

- the first carries `Nats-Expected-Last-Subject-Sequence` = the JetStream sequence
  of the subject's last message as the relay last saw it, so a stale publisher is
  refused (0 = "the subject holds nothing");
- each later one carries `Nats-Expected-Last-Msg-Id` = the id of the message before
  it in the batch. Message ids are unique, so once one message is refused no later
  one can match: what the server stored is always a gap-free prefix of the batch.

When another subject's message lands in the middle of a batch (other publishers
in the same JetStream stream) the chain is cut: the rest of the batch then goes
one message at a time, each fenced on the subject sequence of the previous ack.
A batch refused, or met with a duplicate, returns None: the relay re-reads the
checkpoint, i.e. the last message actually stored, and reconciles by its seq.
`Nats-Msg-Id` is the CloudEvent id (server dedup within the duplicate window), a
second line of defence only: correctness does not rest on the window.

nats-py is asyncio; the relay is synchronous. Each `NatsBus` owns a private event
loop that it drives from the calling thread with `run_until_complete`: no thread
hand-off per call, and the connection's reader runs while a call runs.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

import nats
import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import Header, RawStreamMsg, StorageType, StreamConfig
from nats.protocol.command import hpub_cmd

from bus.names import JetStreamOptions
from bus.nats_connect import connect_once
from bus.seam import BusDown, BusRefused, Checkpoint, Outgoing, Published, positions_text

T = TypeVar("T")

CONTENT_TYPE = "application/cloudevents+json"  # structured mode: the body is the whole CloudEvent
SEQ, OUTBOX, POSITIONS = "Straw-Seq", "Straw-Outbox", "Straw-Positions"
CREATED_BY = "created by straw"  # the description of a JetStream stream straw made: it may add subjects to it

# JetStream API error codes (nats-server's errors.json).
WRONG_LAST_SEQUENCE, WRONG_LAST_MSG_ID = 10071, 10070
STREAM_NOT_FOUND, NO_MESSAGE = 10059, 10037
SUBJECTS_OVERLAP = 10065

_EVENT_HEAD = b'{"specversion":"1.0","id":"'  # how straw.records encodes every event


def covers(pattern: str, subject: str) -> bool:
    """Whether a stream's subject filter (with `*` and `>` wildcards) takes `subject`."""
    want, have = pattern.split("."), subject.split(".")
    for index, token in enumerate(want):
        if token == ">":
            return len(have) > index
        if index >= len(have) or (token != "*" and token != have[index]):
            return False
    return len(want) == len(have)


def event_id(event: bytes) -> str:
    """The CloudEvent id: sliced from straw's own encoding, parsed for any other."""
    if event.startswith(_EVENT_HEAD):
        end = event.index(b'"', len(_EVENT_HEAD))
        return event[len(_EVENT_HEAD) : end].decode()
    return str(orjson.loads(event)["id"])


_NEWLINES = str.maketrans({"\r": " ", "\n": " "})
_STATUS_LINE = b"NATS/1.0\r\n"
_MSG_ID, _SEQ, _POSITIONS = (f"{name}: ".encode() for name in (Header.MSG_ID.value, SEQ, POSITIONS))
# nats-py's own send path (2.16): used when present, see `NatsBus._send`.
RAW_SEND = all(hasattr(Client, name) for name in ("_send_command", "_flush_pending"))


def header_value(text: str) -> str:
    """A header value as nats-py would write it: stripped, CR and LF as spaces (they would end the header)."""
    return text.strip().translate(_NEWLINES)


def header_lines(pairs: Sequence[tuple[str, str]]) -> bytes:
    return b"".join(f"{name}: {header_value(value)}\r\n".encode() for name, value in pairs)


def expectation(header: Header, value: str) -> bytes:
    return header_lines(((header.value, value),))


def parse_header(block: bytes) -> dict[str, str]:
    """A header block back as the dict nats-py's `publish` takes (its fallback path)."""
    lines = block.decode().split("\r\n")[1:]
    return dict(line.split(": ", 1) for line in lines if line)


class Outbound(NamedTuple):
    """One message of a batch, its headers encoded once (a cut batch resends them one by one)."""

    event: bytes
    msg_id: str  # as sent: the next message of the batch expects it
    lines: bytes  # every header line but the expectation, CRLF-terminated


@dataclass(slots=True)
class Awaited:
    """The acks of one batch, filled in by reply as they come: one future for the lot, where a future per
    message and a gather over them were a fifth of the relay's CPU on this bus."""

    acks: list[Msg | None]
    missing: int
    done: asyncio.Future[None]

    def arrived(self, index: int, msg: Msg) -> None:
        if self.acks[index] is None and not self.done.done():
            self.acks[index] = msg
            self.missing -= 1
            if not self.missing:
                self.done.set_result(None)

    async def all(self) -> list[Msg]:
        await self.done
        return [msg for msg in self.acks if msg is not None]


@dataclass(frozen=True, slots=True)
class Tail:
    """The subject's last message as this bus last saw it: the checkpoint and what the next publish expects."""

    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    subject_seq: int = 0  # its JetStream sequence; 0 = the subject holds nothing


def tail_of(msg: RawStreamMsg) -> Tail:
    headers = msg.headers or {}
    positions = headers.get(POSITIONS)
    return Tail(
        Checkpoint(
            seq=int(headers.get(SEQ, 0)),
            outbox=headers.get(OUTBOX),
            positions=dict(json.loads(positions)) if positions else {},
        ),
        int(msg.seq or 0),
    )


@dataclass(frozen=True, slots=True)
class Ack:
    """JetStream's answer to one publish."""

    seq: int = 0
    duplicate: bool = False
    err_code: int | None = None
    error: str | None = None

    @property
    def stored(self) -> bool:
        return self.error is None and not self.duplicate


def ack_of(msg: Msg) -> Ack:
    """Parsed here rather than by nats-py's publish_async, whose error path (2.16) never settles the future."""
    if msg.headers and msg.headers.get("Status") == "503":
        return Ack(error="no JetStream stream answered (503)")
    reply = orjson.loads(msg.data)
    error = reply.get("error")
    if error:
        return Ack(err_code=error.get("err_code"), error=f"{error.get('err_code')}: {error.get('description')}")
    return Ack(int(reply.get("seq", 0)), bool(reply.get("duplicate")))


def _down(exc: BaseException) -> BusDown:
    detail = " ".join(str(exc).split()) or type(exc).__name__
    return BusDown(f"nats unreachable ({type(exc).__name__}: {detail})")


class NatsBus:
    """The `Bus` on NATS JetStream."""

    def __init__(
        self, url: str, *, socket_timeout: float = 10.0, maxlen: int | None = None,
        options: JetStreamOptions | None = None,
    ) -> None:
        self.url = url
        self.timeout = socket_timeout
        self.maxlen = maxlen
        self.options = options or JetStreamOptions()
        self._loop = asyncio.new_event_loop()
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._server_error: str | None = None  # the last -ERR the server sent (permissions arrive this way)
        self._replies: dict[str, tuple[Awaited, int]] = {}  # publish acks awaited, by reply subject: where each goes
        self._reply_prefix = ""
        self._sent = 0
        self._tails: dict[str, Tail] = {}
        self._covered: set[str] = set()  # subjects known to be taken by the JetStream stream

    # -- plumbing -------------------------------------------------------------------------------------------

    async def _on_error(self, exc: Exception) -> None:
        self._server_error = " ".join(str(exc).split())

    async def _noop(self) -> None:
        return None

    async def _on_disconnected(self) -> None:
        """Acks still awaited will never come on this connection: fail them now, not after the timeout."""
        for awaited, _ in self._replies.values():
            if not awaited.done.done():
                awaited.done.set_exception(nats.errors.ConnectionClosedError())
        self._replies.clear()

    async def _connect(self) -> JetStreamContext:
        if self._js is not None and self._nc is not None and self._nc.is_connected:
            return self._js
        if self._nc is not None:  # closed by an outage: the relay opens a new bus after its backoff
            raise BusDown("nats connection lost")  # the relay opens a new bus after its backoff
        # No automatic reconnect: an outage is the relay's to handle (backoff, a new bus, the checkpoint re-read),
        # and nats-py's reconnect buffer would otherwise hold publishes whose fate we could not know.
        self._nc = await connect_once(
            self.url, timeout=min(self.timeout, 5.0), error_cb=self._on_error, disconnected_cb=self._on_disconnected,
            closed_cb=self._noop, reconnected_cb=self._noop, name="straw",
        )
        self._js = self._nc.jetstream(timeout=self.timeout)
        self._reply_prefix = self._nc.new_inbox()
        await self._nc.subscribe(self._reply_prefix + ".*", cb=self._on_reply)
        return self._js

    async def _on_reply(self, msg: Msg) -> None:
        taken = self._replies.pop(msg.subject, None)
        if taken is not None:
            taken[0].arrived(taken[1], msg)

    def _awaiting(self, count: int) -> Awaited:
        return Awaited([None] * count, count, self._loop.create_future())

    def _reply_to(self, awaited: Awaited, index: int) -> str:
        self._sent += 1  # never reused: a late reply to an abandoned batch settles nothing
        subject = f"{self._reply_prefix}.{self._sent}"
        self._replies[subject] = (awaited, index)
        return subject

    def _run(self, work: Coroutine[Any, Any, T]) -> T:
        """Run one call on the private loop, its errors as the seam's."""
        try:
            return self._loop.run_until_complete(asyncio.wait_for(work, self.timeout + 1.0))
        except (BusDown, BusRefused):
            raise
        except nats.errors.Error as exc:
            # nats-py (2.16) raises a plain Error for the server's "Authorization Violation" at connect.
            if isinstance(exc, nats.errors.AuthorizationError) or "authorization violation" in str(exc).lower():
                raise BusRefused(
                    f"NATS authentication failed ({' '.join(str(exc).split())}): check the user and password "
                    "(or token) in bus.url"
                ) from None
            raise self._down_or_refused(exc) from exc
        except (TimeoutError, OSError) as exc:
            raise self._down_or_refused(exc) from exc

    def _down_or_refused(self, exc: BaseException) -> BusDown | BusRefused:
        """A timeout after the server said "permissions violation" is final; anything else is retried."""
        error = self._server_error or ""
        if "permissions violation" in error.lower():
            return BusRefused(
                f"NATS authorization failed ({error}): the user of bus.url needs publish on the stream's "
                f"subjects and on $JS.API.> (stream {self.options.stream!r})"
            )
        return _down(exc)

    async def _ensure(self, js: JetStreamContext, subject: str) -> None:
        """The JetStream stream exists and takes `subject`: created if missing, else bound to as it is."""
        if subject in self._covered:
            return
        name = self.options.stream
        try:
            info = await js.stream_info(name)
        except nats.js.errors.NotFoundError:
            info = None
        if info is None:
            try:
                await js.add_stream(self._new_stream_config(subject))
            except nats.js.errors.APIError as exc:
                if exc.err_code == SUBJECTS_OVERLAP:
                    raise self._overlap(subject) from None
                info = await js.stream_info(name)  # made at the same moment by another straw: bind to it
        if info is not None:
            subjects = list(info.config.subjects or [])
            if not any(covers(pattern, subject) for pattern in subjects):
                if info.config.description != CREATED_BY:
                    raise BusRefused(
                        f"JetStream stream {name!r} does not take subject {subject!r} (its subjects: "
                        f"{', '.join(subjects) or 'none'}); add it to the stream's subjects, or set "
                        "bus.jetstream.stream to a stream that takes it"
                    )
                info.config.subjects = [*subjects, subject]
                try:
                    await js.update_stream(info.config)
                except nats.js.errors.APIError as exc:
                    if exc.err_code == SUBJECTS_OVERLAP:
                        raise self._overlap(subject) from None
                    raise
        self._covered.add(subject)

    def _overlap(self, subject: str) -> BusRefused:
        return BusRefused(
            f"subject {subject!r} belongs to another JetStream stream; set bus.jetstream.stream to that stream's "
            "name to bind to it"
        )

    def _new_stream_config(self, subject: str) -> StreamConfig:
        options = self.options
        return StreamConfig(
            name=options.stream,
            description=CREATED_BY,
            subjects=[subject],
            storage=StorageType.FILE,
            max_age=options.max_age,
            max_bytes=options.max_bytes,
            max_msgs_per_subject=self.maxlen or -1,  # -1: no limit
            duplicate_window=options.duplicate_window,
            num_replicas=options.replicas,
        )

    async def _read_tail(self, js: JetStreamContext, stream: str) -> Tail:
        await self._ensure(js, stream)
        try:
            msg = await js.get_last_msg(self.options.stream, stream)
        except nats.js.errors.NotFoundError as exc:
            if exc.err_code == STREAM_NOT_FOUND:  # deleted under us: make it again on the next call
                self._covered.discard(stream)
                raise BusDown(f"JetStream stream {self.options.stream!r} vanished") from None
            tail = Tail()
        else:
            tail = tail_of(msg)
        self._tails[stream] = tail
        return tail

    # -- the seam ---------------------------------------------------------------------------------------------

    def checkpoint(self, stream: str) -> Checkpoint:
        async def work() -> Checkpoint:
            js = await self._connect()
            return (await self._read_tail(js, stream)).checkpoint

        return self._run(work())

    def publish(self, stream: str, seen: Checkpoint, batch: Sequence[Outgoing], identity: str) -> Checkpoint | None:
        return self._run(self._publish(stream, seen, batch, identity))

    async def _publish(
        self, stream: str, seen: Checkpoint, batch: Sequence[Outgoing], identity: str
    ) -> Checkpoint | None:
        js = await self._connect()
        tail = self._tails.get(stream)
        if tail is None or (tail.checkpoint.seq, tail.checkpoint.outbox) != (seen.seq, seen.outbox):
            tail = await self._read_tail(js, stream)
            if (tail.checkpoint.seq, tail.checkpoint.outbox) != (seen.seq, seen.outbox):
                return None
        del self._tails[stream]  # unknown until every ack is in
        positions = dict(tail.checkpoint.positions)
        fixed = header_lines((("Content-Type", CONTENT_TYPE), (OUTBOX, identity)))  # the same on every message
        messages: list[Outbound] = []
        for seq, source, position, event in batch:
            positions[source] = position
            msg_id = header_value(event_id(event))
            messages.append(Outbound(event, msg_id, b"".join((
                _MSG_ID, msg_id.encode(), b"\r\n", _SEQ, b"%d\r\n" % seq,
                _POSITIONS, positions_text(positions).encode(), b"\r\n", fixed,
            ))))
        acks = await self._pipelined(stream, messages, tail.subject_seq)
        await self._same_subject(stream, acks)
        stored = next((i for i, ack in enumerate(acks) if not ack.stored), len(acks))
        rest = acks[stored:]
        if any(ack.error is not None and ack.err_code not in (WRONG_LAST_SEQUENCE, WRONG_LAST_MSG_ID) for ack in rest):
            failed = next(ack.error for ack in rest if ack.error is not None)
            raise BusDown(f"JetStream did not store a message of {stream!r} ({failed})")
        if rest and (stored == 0 or any(ack.stored or ack.duplicate for ack in rest)):
            return None  # refused (a stale publisher), or a duplicate: the caller re-reads the subject's tail
        last = acks[-1].seq if not rest else await self._one_by_one(stream, messages[stored:], acks[stored - 1].seq)
        if last is None:
            return None
        moved = Checkpoint(batch[-1].seq, identity, positions)
        self._tails[stream] = Tail(moved, last)
        return moved

    async def _pipelined(self, stream: str, messages: list[Outbound], after: int) -> list[Ack]:
        """All sent, then all acks awaited: the first fenced on the subject's last sequence, each later one on
        the id of the one before (a stream-wide check: another subject's message in between cuts the chain)."""
        awaited = self._awaiting(len(messages))
        expect = expectation(Header.EXPECTED_LAST_SUBJECT_SEQUENCE, str(after))
        for index, message in enumerate(messages):
            await self._send(stream, self._reply_to(awaited, index), message, expect)
            expect = expectation(Header.EXPECTED_LAST_MSG_ID, message.msg_id)
        return [ack_of(msg) for msg in await awaited.all()]

    async def _send(self, subject: str, reply: str, message: Outbound, expect: bytes) -> None:
        """One HPUB of the message's prebuilt header lines plus its expectation.

        nats-py's `publish` re-checks and re-encodes every header of every message (a regex, a strip and a
        translate per header: half the relay's CPU on this bus, measured). straw's header values are its own and
        already made safe (`header_value`), so the frame is handed to the client's send queue as `publish` itself
        does after encoding; on a nats-py without those internals, through `publish` as before."""
        nc = self._nc
        assert nc is not None
        header = b"".join((_STATUS_LINE, message.lines, expect, b"\r\n"))
        if not RAW_SEND:
            await nc.publish(subject, message.event, reply=reply, headers=parse_header(header))
            return
        if nc.is_closed:
            raise nats.errors.ConnectionClosedError
        if len(message.event) > nc.max_payload:
            raise nats.errors.MaxPayloadError
        await nc._send_command(hpub_cmd(subject, reply, header, message.event))
        if nc._flush_queue is not None and nc._flush_queue.empty():
            await nc._flush_pending()  # what publish does: wake the flusher, which writes once we await the acks

    async def _same_subject(self, stream: str, acks: list[Ack]) -> None:
        """A duplicate is only harmless if its first copy is on this subject: dedup is JetStream-stream-wide,
        so the same event id from another subject means two straw instances share an instance name."""
        for ack in acks:
            if ack.duplicate:
                first = await self._nc_js().get_msg(self.options.stream, ack.seq)
                if first.subject != stream:
                    raise BusRefused(
                        f"JetStream stream {self.options.stream!r} already holds an event of {stream!r} on subject "
                        f"{first.subject!r} (same Nats-Msg-Id): two straw instances with the same `instance` name "
                        "publish one source to two subjects; give each instance its own name"
                    )

    def _nc_js(self) -> JetStreamContext:
        assert self._js is not None
        return self._js

    async def _one_by_one(self, stream: str, messages: list[Outbound], after: int) -> int | None:
        """The rest of a batch another publisher's message cut (same JetStream stream, other subject): one at a
        time, each fenced on the subject's last sequence as the previous ack gave it. None if refused."""
        for message in messages:
            awaited = self._awaiting(1)
            await self._send(stream, self._reply_to(awaited, 0), message,
                             expectation(Header.EXPECTED_LAST_SUBJECT_SEQUENCE, str(after)))
            ack = ack_of((await awaited.all())[0])
            await self._same_subject(stream, [ack])
            if not ack.stored:
                if ack.error is not None and ack.err_code != WRONG_LAST_SEQUENCE:
                    raise BusDown(f"JetStream did not store a message of {stream!r} ({ack.error})")
                return None
            after = ack.seq
        return after

    def describe(self) -> tuple[bool, str]:
        async def work() -> tuple[bool, str]:
            js = await self._connect()
            assert self._nc is not None
            server = self._nc.connected_server_version
            version = f"{server.major}.{server.minor}.{server.patch}"
            try:
                await js.account_info()
            except (nats.js.errors.ServiceUnavailableError, nats.js.errors.NoStreamResponseError,
                    nats.errors.NoRespondersError):
                return False, f"nats-server {version} without JetStream (start it with -js)"
            return True, f"nats-server {version}, JetStream stream {self.options.stream!r}"

        return self._run(work())

    def length(self, stream: str) -> int:
        async def work() -> int:
            js = await self._connect()
            try:
                info = await js.stream_info(self.options.stream, subjects_filter=stream)
            except nats.js.errors.NotFoundError:
                return 0
            return int((info.state.subjects or {}).get(stream, 0))

        return self._run(work())

    def newest(self, stream: str, count: int) -> list[Published]:
        """Walks back from the subject's last message; other subjects' messages are skipped."""

        async def work() -> list[Published]:
            js = await self._connect()
            found: list[Published] = []
            try:
                msg = await js.get_last_msg(self.options.stream, stream)
            except nats.js.errors.NotFoundError:
                return found
            seq = int(msg.seq or 0)
            while True:
                if msg.subject == stream:
                    found.append(Published(str(msg.seq), int((msg.headers or {}).get(SEQ, 0)), msg.data or b""))
                seq -= 1
                if len(found) >= count or seq < 1:
                    break
                try:
                    msg = await js.get_msg(self.options.stream, seq)
                except nats.js.errors.NotFoundError:  # deleted or aged out
                    msg = RawStreamMsg(subject="", seq=seq)
            return list(reversed(found))

        return self._run(work())

    def close(self) -> None:
        if self._loop.is_closed():
            return
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None and not nc.is_closed:
            with suppress(Exception):  # closing a connection to a server that is gone fails in many ways
                self._loop.run_until_complete(asyncio.wait_for(nc.close(), 2.0))
        leftover = asyncio.all_tasks(self._loop)  # a dead connection's reader and pinger
        for task in leftover:
            task.cancel()
        with suppress(Exception):  # closing a connection to a server that is gone fails in many ways
            self._loop.run_until_complete(asyncio.gather(*leftover, return_exceptions=True))
        self._loop.close()

