"""Publish outbox records to the bus exactly once.

One round per batch: the bus appends the batch and moves the stream's checkpoint
only if the checkpoint is still what this relay last saw (for Redis, one Lua
script call; see bus/). A checkpoint that moved (another relay, or our own write
whose reply was lost) is re-read: records at or below its `seq` are already on
the bus, so they are marked published (the crash reconciliation), never sent
again.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import structlog

from bus.seam import Bus, BusDown, BusRefused, Checkpoint
from outbox.store import Outbox
from straw.redact import redact

log = structlog.get_logger("straw.relay")


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


def adopt_streams(bus: Bus, outbox: Outbox, streams: list[str]) -> None:
    """Before this outbox first polls for a stream, continue from the stream's checkpoint."""
    for stream in streams:
        if outbox.stream_known(stream):
            continue
        ckpt = bus.checkpoint(stream)
        outbox.adopt(stream, ckpt.seq, ckpt.positions)
        if ckpt.seq:
            log.info("adopted checkpoint", stream=stream, seq=ckpt.seq, previous_outbox=ckpt.outbox)


class Relay:
    """Publishes one stream's outbox records, a batch per round, each batch in one compare-and-set on the bus.

    The bus appends the batch and moves the checkpoint only if the checkpoint
    still holds what this relay last saw. Anything else (a crash after the
    publish, a lost reply, another outbox) is settled by re-reading the
    checkpoint and reconciling, never by resending blindly.
    """

    def __init__(self, bus: Bus, outbox: Outbox, *, batch_size: int = 1000) -> None:
        self.bus = bus
        self.outbox = outbox
        self.batch_size = batch_size
        self._seen: dict[str, Checkpoint] = {}  # per stream: the checkpoint as of our last round

    def _checkpoint(self, stream: str) -> tuple[Checkpoint, int]:
        """The stream's checkpoint, re-read unless this relay wrote it; and how many records it reconciled."""
        seen = self._seen.get(stream)
        if seen is not None:
            return seen, 0
        seen = self.bus.checkpoint(stream)
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
        counts: dict[str, int] = {}
        for record in batch:
            counts[record.source] = counts.get(record.source, 0) + 1
        self._seen.pop(stream, None)  # unknown until the bus answers
        moved = self.bus.publish(stream, ckpt, batch, outbox.identity)
        if moved is None:
            log.warning("checkpoint moved under us; re-reading", stream=stream)
            return Round(stream, reconciled, True)
        self._seen[stream] = moved
        published = outbox.mark_published(stream, moved.seq, counts)
        return Round(stream, reconciled + published, len(batch) == self.batch_size)


@dataclass
class Health:
    """What the relay thread shares with whoever supervises it."""

    down_since: float | None = None  # monotonic time the bus became unreachable

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
    make_bus: Callable[[], Bus],
    outbox: Outbox,
    streams: list[str],
    *,
    stop: StopFlag,
    batch_size: int = 1000,
    idle_interval: float = 0.2,
    backoff_max: float = 30.0,
    drained: Callable[[], bool] | None = None,
    wake: threading.Event | None = None,
    health: Health | None = None,
    after_round: Callable[[Bus], None] | None = None,
) -> None:
    """Publish until `stop` is set, or, with `drained`, until it says no more will come and all is sent.

    Bus down: records wait in the outbox; we retry with backoff, and say so in
    the log and in the outbox's stream state (shown by `straw status`).
    `after_round`: called with the bus after each round (the retention trim).
    """
    backoff = Backoff(maximum=backoff_max)
    health = health or Health()
    bus: Bus | None = None
    relay: Relay | None = None
    while not stop.is_set():
        try:
            if relay is None:
                bus = make_bus()
                adopt_streams(bus, outbox, streams)
                relay = Relay(bus, outbox, batch_size=batch_size)
            more = False
            for stream in streams:
                started = time.monotonic()
                done = relay.publish(stream)
                if done.published:
                    health.published(stream, done.published, time.monotonic() - started)
                more = done.more or more
            if after_round is not None and bus is not None:
                after_round(bus)
            health.down_since = None
            if backoff.current:
                log.info("bus reachable again; publishing", streams=streams)
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
        except BusRefused as failure:
            log.error("relay stopped", error=str(failure))
            for stream in streams:
                if outbox.stream_known(stream):
                    outbox.stream_error(stream, redact(str(failure)))
            if bus is not None:
                bus.close()
            raise
        except BusDown as exc:
            if health.down_since is None:
                health.down_since = time.monotonic()
            delay = backoff.next()
            # Redacted before it is stored: `straw status` and the metrics show this text to anyone.
            message = redact(f"{exc}; {outbox.backlog()} records wait in the outbox")
            log.warning("relay waiting for the bus", error=message, retry_in=round(delay, 2))
            for stream in streams:
                if outbox.stream_known(stream):
                    outbox.stream_error(stream, message)
            if bus is not None:
                bus.close()
            bus, relay = None, None
            stop.wait(delay)
        except SplitBrain as exc:
            log.error("relay stopped", error=str(exc))
            for stream in streams:
                outbox.stream_error(stream, redact(str(exc)))
            raise
    if bus is not None:
        bus.close()
