"""Publish outbox records to Redis streams exactly once.

One round per batch: a Lua script that, atomically in Redis, checks that the
stream's checkpoint is what this relay last saw, XADDs the batch in `seq` order
and moves the checkpoint (HSET `seq`, `outbox`, `pos:<source>`). It is the
WATCH/MULTI/EXEC of the design in one round trip and one reply. A checkpoint
that moved (another relay, or our own write whose reply was lost) is re-read:
records at or below its `seq` are already in the stream, so they are marked
published (the crash reconciliation), never sent again.
"""

from __future__ import annotations

import datetime as dt
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import redis
import structlog

from outbox.checkpoint import POS_PREFIX, Checkpoint, checkpoint_key
from outbox.store import Outbox
from straw.redact import redact

log = structlog.get_logger("straw.relay")

# Refused credentials or permissions are final: waiting does not fix a password. They are caught before
# REDIS_DOWN (redis-py's AuthenticationError is a ConnectionError).
REDIS_REFUSED = (redis.AuthenticationError, redis.exceptions.AuthenticationWrongNumberOfArgsError,
                 redis.exceptions.NoPermissionError)
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, ConnectionError, OSError)


class RedisRefused(Exception):
    """Redis refused our credentials (AUTH) or the ACL user's permissions (NOPERM)."""


def refused(exc: BaseException) -> RedisRefused:
    """The one line for refused credentials: authentication failed, or the ACL user lacks a permission."""
    detail = " ".join(str(exc).split())
    if isinstance(exc, redis.exceptions.NoPermissionError):
        return RedisRefused(
            f"Redis authorization failed ({detail}): the ACL user of redis.url needs +@read +@write +@stream "
            "+@scripting +@connection on the streams and their checkpoint keys"
        )
    return RedisRefused(f"Redis authentication failed ({detail}): check the user and password in redis.url")


class StopFlag(Protocol):
    """A threading.Event or a multiprocessing Event."""

    def is_set(self) -> bool: ...
    def wait(self, timeout: float | None = None) -> bool: ...


class SplitBrain(Exception):
    """Another outbox publishes to this stream: two instances poll the same source."""


@dataclass(frozen=True, slots=True)
class Round:
    stream: str
    published: int  # records newly in the stream (this round's XADDs plus any reconciled)
    more: bool  # a full batch was sent: there may be more right away


def connect(url: str, socket_timeout: float = 10.0) -> redis.Redis:
    return redis.Redis.from_url(
        url, socket_timeout=socket_timeout, socket_connect_timeout=min(socket_timeout, 5.0), health_check_interval=30
    )


def read_checkpoint(client: redis.Redis, stream: str) -> Checkpoint:
    return Checkpoint.parse(client.hgetall(checkpoint_key(stream)))


def adopt_streams(client: redis.Redis, outbox: Outbox, streams: list[str]) -> None:
    """Before this outbox first polls for a stream, continue from the stream's checkpoint."""
    for stream in streams:
        if outbox.stream_known(stream):
            continue
        ckpt = read_checkpoint(client, stream)
        outbox.adopt(stream, ckpt.seq, ckpt.positions)
        if ckpt.seq:
            log.info("adopted checkpoint", stream=stream, seq=ckpt.seq, previous_outbox=ckpt.outbox)


# One atomic step in Redis: publish only if the checkpoint is what this relay last saw.
# KEYS: stream, checkpoint. ARGV: expected seq, expected outbox, our outbox, time, maxlen ('' = none),
# n position fields, then n (field, value) pairs, then (seq, pos, event) per record.
_PUBLISH = """
local state = redis.call('HMGET', KEYS[2], 'seq', 'outbox')
local seq, owner = state[1] or '0', state[2] or ''
if seq ~= ARGV[1] or owner ~= ARGV[2] then
  return {0, seq, owner}
end
local maxlen = ARGV[5]
local first = 7 + 2 * tonumber(ARGV[6])
local last = seq
for i = first, #ARGV, 3 do
  if maxlen == '' then
    redis.call('XADD', KEYS[1], '*', 'seq', ARGV[i], 'pos', ARGV[i + 1], 'event', ARGV[i + 2])
  else
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', 'seq', ARGV[i], 'pos', ARGV[i + 1], 'event', ARGV[i + 2])
  end
  last = ARGV[i]
end
local fields = {'seq', last, 'outbox', ARGV[3], 'at', ARGV[4]}
for i = 7, first - 1 do
  fields[#fields + 1] = ARGV[i]
end
redis.call('HSET', KEYS[2], unpack(fields))
return {1, last, ARGV[3]}
"""


class Relay:
    """Publishes one stream's outbox records, a batch per round, each batch in one atomic script call.

    The script is a compare-and-set: it appends the batch and moves the checkpoint
    only if the checkpoint still holds what this relay last saw. Anything else (a
    crash after the script ran, a lost reply, another outbox) is settled by
    re-reading the checkpoint and reconciling, never by resending blindly.
    """

    def __init__(
        self, client: redis.Redis, outbox: Outbox, *, batch_size: int = 1000, maxlen: int | None = None
    ) -> None:
        self.client = client
        self.outbox = outbox
        self.batch_size = batch_size
        self.maxlen = maxlen
        self._script = client.register_script(_PUBLISH)
        self._seen: dict[str, Checkpoint] = {}  # per stream: the checkpoint as of our last round

    def _checkpoint(self, stream: str) -> tuple[Checkpoint, int]:
        """The stream's checkpoint, re-read unless this relay wrote it; and how many records it reconciled."""
        seen = self._seen.get(stream)
        if seen is not None:
            return seen, 0
        seen = read_checkpoint(self.client, stream)
        reconciled = 0
        if seen.outbox == self.outbox.identity:
            reconciled = self.outbox.mark_published(stream, seen.seq)
            if reconciled:
                log.info("reconciled with stream", stream=stream, seq=seen.seq, records=reconciled)
        self._seen[stream] = seen
        return seen, reconciled

    def publish(self, stream: str) -> Round:
        outbox = self.outbox
        ckpt, reconciled = self._checkpoint(stream)
        batch = outbox.pending(stream, outbox.published_seq(stream), self.batch_size)
        if not batch:
            return Round(stream, reconciled, False)
        if ckpt.outbox not in (None, outbox.identity) and batch[0].seq <= ckpt.seq:
            self._seen.pop(stream, None)
            raise SplitBrain(
                f"stream {stream!r}: checkpoint seq {ckpt.seq} was written by outbox {ckpt.outbox}, "
                f"yet this outbox ({outbox.identity}) still holds seq {batch[0].seq}; "
                "two straw instances publish to this stream. Stop one of them."
            )
        positions: dict[str, str] = {}
        records: list[bytes | str | int] = []
        counts: dict[str, int] = {}
        for seq, source, position, event in batch:
            records += (seq, position, event)
            positions[POS_PREFIX + source] = position
            counts[source] = counts.get(source, 0) + 1
        args: list[bytes | str | int] = [
            ckpt.seq,
            ckpt.outbox or "",
            outbox.identity,
            dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
            self.maxlen or "",
            len(positions),
        ]
        for field, value in positions.items():
            args += (field, value)
        args += records
        self._seen.pop(stream, None)  # unknown until Redis answers
        done, seq, _owner = self._script(keys=[stream, checkpoint_key(stream)], args=args)
        if not done:
            log.warning("checkpoint moved under us; re-reading", stream=stream, seq=int(seq))
            return Round(stream, reconciled, True)
        last = batch[-1][0]
        self._seen[stream] = Checkpoint(last, outbox.identity)
        published = outbox.mark_published(stream, last, counts)
        return Round(stream, reconciled + published, len(batch) == self.batch_size)


@dataclass
class Health:
    """What the relay thread shares with whoever supervises it."""

    down_since: float | None = None  # monotonic time Redis became unreachable

    def published(self, stream: str, records: int, seconds: float) -> None:
        """A round put `records` new records in `stream` in `seconds` (the metrics' publish latency)."""


@dataclass
class Backoff:
    initial: float = 0.2
    maximum: float = 30.0
    current: float = 0.0

    def next(self) -> float:
        self.current = min(self.maximum, max(self.initial, self.current * 2))
        return self.current * random.uniform(0.75, 1.25)

    def reset(self) -> None:
        self.current = 0.0


def run_relay(
    make_client: Callable[[], redis.Redis],
    outbox: Outbox,
    streams: list[str],
    *,
    stop: StopFlag,
    batch_size: int = 1000,
    maxlen: int | None = None,
    idle_interval: float = 0.2,
    backoff_max: float = 30.0,
    drained: Callable[[], bool] | None = None,
    wake: threading.Event | None = None,
    health: Health | None = None,
    after_round: Callable[[redis.Redis], None] | None = None,
) -> None:
    """Publish until `stop` is set, or, with `drained`, until it says no more will come and all is sent.

    Redis down: records wait in the outbox; we retry with backoff, and say so in
    the log and in the outbox's stream state (shown by `straw status`).
    `after_round`: called with the client after each round (the retention trim).
    """
    backoff = Backoff(maximum=backoff_max)
    health = health or Health()
    client: redis.Redis | None = None
    relay: Relay | None = None
    while not stop.is_set():
        try:
            if relay is None:
                client = make_client()
                adopt_streams(client, outbox, streams)
                relay = Relay(client, outbox, batch_size=batch_size, maxlen=maxlen)
            more = False
            for stream in streams:
                started = time.monotonic()
                done = relay.publish(stream)
                if done.published:
                    health.published(stream, done.published, time.monotonic() - started)
                more = done.more or more
            if after_round is not None and client is not None:
                after_round(client)
            health.down_since = None
            if backoff.current:
                log.info("redis reachable again; publishing", streams=streams)
                for stream in streams:
                    outbox.stream_error(stream, None)
                backoff.reset()
            if more:
                continue
            if drained is not None and drained() and outbox.backlog() == 0:
                return
            if wake is None:
                stop.wait(idle_interval)
            else:  # woken early when there is news (polling done, stop), so a short run ends promptly
                wake.wait(idle_interval)
                wake.clear()
        except REDIS_REFUSED as exc:
            failure = refused(exc)
            log.error("relay stopped", error=str(failure))
            for stream in streams:
                if outbox.stream_known(stream):
                    outbox.stream_error(stream, redact(str(failure)))
            if client is not None:
                client.close()
            raise failure from None
        except REDIS_DOWN as exc:
            if health.down_since is None:
                health.down_since = time.monotonic()
            delay = backoff.next()
            # Redacted before it is stored: `straw status` and the metrics show this text to anyone.
            message = redact(
                f"redis unreachable ({type(exc).__name__}: {exc}); {outbox.backlog()} records wait in the outbox"
            )
            log.warning("relay waiting for redis", error=message, retry_in=round(delay, 2))
            for stream in streams:
                if outbox.stream_known(stream):
                    outbox.stream_error(stream, message)
            if client is not None:
                client.close()
            client, relay = None, None
            stop.wait(delay)
        except SplitBrain as exc:
            log.error("relay stopped", error=str(exc))
            for stream in streams:
                outbox.stream_error(stream, redact(str(exc)))
            raise
    if client is not None:
        client.close()
