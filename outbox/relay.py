"""Publish outbox records to Redis streams exactly once.

One round: WATCH the stream's checkpoint, read it, reconcile (records at or
below its `seq` are already in the stream: mark them published), then MULTI,
XADD the next batch in order, HSET the checkpoint, EXEC. An aborted EXEC means
another relay wrote the checkpoint: re-read, never resend blindly. A connection
lost during EXEC is resolved the same way, by the next round's reconcile.
"""

from __future__ import annotations

import datetime as dt
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis
import structlog

from outbox.checkpoint import POS_PREFIX, Checkpoint, checkpoint_key
from outbox.store import Outbox

log = structlog.get_logger("straw.relay")

REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, ConnectionError, OSError)


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


class Relay:
    def __init__(
        self, client: redis.Redis, outbox: Outbox, *, batch_size: int = 1000, maxlen: int | None = None
    ) -> None:
        self.client = client
        self.outbox = outbox
        self.batch_size = batch_size
        self.maxlen = maxlen

    def publish(self, stream: str) -> Round:
        key = checkpoint_key(stream)
        outbox = self.outbox
        with self.client.pipeline(transaction=True) as pipe:
            pipe.watch(key)
            ckpt = Checkpoint.parse(pipe.hgetall(key))
            reconciled = 0
            if ckpt.outbox == outbox.identity:
                reconciled = outbox.mark_published(stream, ckpt.seq)
                if reconciled:
                    log.info("reconciled with stream", stream=stream, seq=ckpt.seq, records=reconciled)
            after = outbox.published_seq(stream)
            batch = outbox.pending(stream, after, self.batch_size)
            if not batch:
                pipe.unwatch()
                return Round(stream, reconciled, False)
            if ckpt.outbox not in (None, outbox.identity) and batch[0].seq <= ckpt.seq:
                raise SplitBrain(
                    f"stream {stream!r}: checkpoint seq {ckpt.seq} was written by outbox {ckpt.outbox}, "
                    f"yet this outbox ({outbox.identity}) still holds seq {batch[0].seq}; "
                    "two straw instances publish to this stream. Stop one of them."
                )
            last_position: dict[str, str] = {}
            pipe.multi()
            maxlen = self.maxlen
            for record in batch:
                pipe.xadd(
                    stream,
                    {"seq": record.seq, "pos": record.position, "event": record.event},
                    maxlen=maxlen,
                    approximate=True,
                )
                last_position[POS_PREFIX + record.source] = record.position
            last = batch[-1].seq
            pipe.hset(
                key,
                mapping={
                    "seq": last,
                    "outbox": outbox.identity,
                    "at": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
                    **last_position,
                },
            )
            pipe.execute()
        published = outbox.mark_published(stream, last)
        return Round(stream, reconciled + published, len(batch) == self.batch_size)


@dataclass
class Health:
    """What the relay thread shares with whoever supervises it."""

    down_since: float | None = None  # monotonic time Redis became unreachable


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
    stop: threading.Event,
    batch_size: int = 1000,
    maxlen: int | None = None,
    idle_interval: float = 0.2,
    backoff_max: float = 30.0,
    drained: Callable[[], bool] | None = None,
    health: Health | None = None,
) -> None:
    """Publish until `stop` is set, or, with `drained`, until it says no more will come and all is sent.

    Redis down: records wait in the outbox; we retry with backoff, and say so in
    the log and in the outbox's stream state (shown by `straw status`).
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
                try:
                    result = relay.publish(stream)
                except redis.WatchError:
                    log.warning("checkpoint changed under us; re-reading", stream=stream)
                    more = True
                    continue
                more = more or result.more
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
            stop.wait(idle_interval)
        except REDIS_DOWN as exc:
            if health.down_since is None:
                health.down_since = time.monotonic()
            delay = backoff.next()
            message = f"redis unreachable ({type(exc).__name__}: {exc}); {outbox.backlog()} records wait in the outbox"
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
                outbox.stream_error(stream, str(exc))
            raise
    if client is not None:
        client.close()
