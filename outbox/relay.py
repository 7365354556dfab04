"""Publish outbox records to the bus exactly once.

One round per batch: the bus appends the batch and moves the stream's checkpoint
only if the checkpoint is still what this relay last saw (for Redis, one Lua
script call; see bus/). A checkpoint that moved (another relay, or our own write
whose reply was lost) is re-read: records at or below its `seq` are already on
the bus, so they are marked published (the crash reconciliation), never sent
again.

A checkpoint *below* the seq this outbox published is the bus losing
acknowledged writes (a failover to a replica that lagged, a restart from an
older snapshot): the relay re-publishes the lost range from the records the
outbox retains, in order, with the same ids and seqs; if they are no longer
retained, it stops with `Gap` rather than publish over the hole.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from operator import itemgetter
from typing import Protocol, TypeVar

import structlog

from bus.seam import Bus, BusDown, BusRefused, Checkpoint
from outbox.store import Keep, Outbox
from straw.redact import redact

log = structlog.get_logger("straw.relay")
T = TypeVar("T")


class StopFlag(Protocol):
    """A threading.Event or a multiprocessing Event."""

    def is_set(self) -> bool: ...
    def wait(self, timeout: float | None = None) -> bool: ...


class SplitBrain(Exception):
    """Another outbox publishes to this stream: two instances poll the same source."""


class Gap(Exception):
    """The bus lost records this outbox no longer retains: the stream must be replayed from the sources."""


def gap_message(stream: str, bus_seq: int, published: int, missing: tuple[int, int]) -> str:
    return (
        f"stream {stream!r}: the bus lost published records (its checkpoint is at seq {bus_seq}, this outbox "
        f"published up to seq {published}) and seq {missing[0]}..{missing[1]} is no longer retained "
        f"(outbox.retain), so it cannot be re-published; nothing more is published to this stream. "
        f"Replay it from the sources: stop straw, run `straw reread {stream}` (incremental sources go back to "
        f"their positions on the bus checkpoint, snapshot sources send a full listing), then start straw"
    )


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
        self.repairing: dict[str, int] = {}  # per stream under repair: the published seq the bus must reach

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
        self._rolled_back(stream, seen)
        self._seen[stream] = seen
        return seen, reconciled

    def _rolled_back(self, stream: str, seen: Checkpoint) -> None:
        """A checkpoint below our published seq: the bus lost what it acknowledged. Repair, or stop on a gap."""
        published = self.outbox.published_seq(stream)
        if seen.seq >= published:
            return
        if seen.outbox not in (None, self.outbox.identity):
            raise SplitBrain(
                f"stream {stream!r}: checkpoint seq {seen.seq} is below seq {published} this outbox "
                f"({self.outbox.identity}) published, and was written by outbox {seen.outbox}: the bus lost "
                "records and another straw instance published after that. Stop one of them."
            )
        pruned = self.outbox.pruned_seq(stream)
        missing = (seen.seq + 1, pruned) if seen.seq < pruned else None
        new = self.outbox.rollback_seen(stream, seen.seq, published, missing)
        if missing is not None:
            raise Gap(gap_message(stream, seen.seq, published, missing))
        if stream not in self.repairing:
            log.error("bus rolled back: re-publishing the lost range from the outbox" if new
                      else "bus rolled back: resuming the re-publishing", stream=stream,
                      bus_seq=seen.seq, published_seq=published, first=seen.seq + 1, last=published)
        self.repairing[stream] = published

    def verify(self, stream: str) -> Checkpoint:
        """Re-read the stream's checkpoint now (and act on a rollback): what the bus holds at this moment."""
        self._seen.pop(stream, None)
        return self._checkpoint(stream)[0]

    def publish(self, stream: str) -> Round:
        outbox = self.outbox
        ckpt, reconciled = self._checkpoint(stream)
        # Repairing a rollback, the records above the checkpoint are retained ones: sent again, same seqs.
        batch = outbox.pending(stream, min(ckpt.seq, outbox.published_seq(stream)), self.batch_size)
        if not batch:
            return Round(stream, reconciled, False)
        if ckpt.outbox not in (None, outbox.identity) and batch[0].seq <= ckpt.seq:
            self._seen.pop(stream, None)
            raise SplitBrain(
                f"stream {stream!r}: checkpoint seq {ckpt.seq} was written by outbox {ckpt.outbox}, "
                f"yet this outbox ({outbox.identity}) still holds seq {batch[0].seq}; "
                "two straw instances publish to this stream. Stop one of them."
            )
        # Counted in C (Counter, map): a Python loop here was 5 % of the relay's CPU per record.
        counts = dict(Counter(map(itemgetter(1), batch)))
        size = sum(map(len, map(itemgetter(3), batch)))
        self._seen.pop(stream, None)  # unknown until the bus answers
        moved = self.bus.publish(stream, ckpt, batch, outbox.identity)
        if moved is None:
            log.warning("checkpoint moved under us; re-reading", stream=stream)
            return Round(stream, reconciled, True)
        self._seen[stream] = moved
        if stream in self.repairing:  # the batch may hold records counted when first published: count them there
            published = outbox.mark_published(stream, moved.seq)
        else:
            published = outbox.mark_published(stream, moved.seq, counts, size)
        target = self.repairing.get(stream)
        if target is not None and moved.seq >= target:
            del self.repairing[stream]
            rollback = outbox.rollback_repaired(stream)
            log.warning("bus rollback repaired", stream=stream, detail=rollback.describe() if rollback else None)
        return Round(stream, reconciled + published, len(batch) >= self.batch_size)


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
    keep: Keep | None = None,
    prune_interval: float = 10.0,
) -> None:
    """Publish until `stop` is set, or, with `drained`, until it says no more will come and all is sent.

    Bus down: records wait in the outbox; we retry with backoff, and say so in
    the log and in the outbox's stream state (shown by `straw status`).
    `after_round`: called with the bus after each round (the retention trim).
    A stream with a `Gap` stops; the others go on, and `Gap` is raised when the relay ends.
    """
    backoff = Backoff(maximum=backoff_max)
    health = health or Health()
    keep = keep or Keep()
    bus: Bus | None = None
    relay: Relay | None = None
    halted: dict[str, str] = {}  # streams stopped on a gap: why
    next_prune = 0.0
    while not stop.is_set():
        try:
            if relay is None:
                bus = make_bus()
                adopt_streams(bus, outbox, streams)
                relay = Relay(bus, outbox, batch_size=batch_size)
            more = False
            for stream in streams:
                started = time.monotonic()
                round_ = _unless_gap(outbox, halted, stream, relay.publish)
                if round_ is not None and round_.published:
                    health.published(stream, round_.published, time.monotonic() - started)
                more = more or (round_ is not None and round_.more)
            if after_round is not None and bus is not None:
                after_round(bus)
            if time.monotonic() >= next_prune:
                # Prune only below what the bus holds now: this re-reads each checkpoint, so a rollback of an
                # idle stream is noticed here too, before its records could go.
                holds = {s: ckpt.seq for s in streams if (ckpt := _unless_gap(outbox, halted, s, relay.verify))}
                pruned = outbox.prune(keep, holds)
                next_prune = 0.0 if pruned else time.monotonic() + prune_interval
            health.down_since = None
            if backoff.current:
                log.info("bus reachable again; publishing", streams=streams)
                for stream in streams:
                    if stream not in halted:
                        outbox.stream_error(stream, None)
                backoff.reset()
            if more:
                continue
            if drained is not None and drained() and not relay.repairing and _sent(outbox, streams, halted):
                break
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
    if halted:
        raise Gap("; ".join(halted.values()))


def _unless_gap(outbox: Outbox, halted: dict[str, str], stream: str, step: Callable[[str], T]) -> T | None:
    """`step(stream)`, unless the stream stopped on a gap; a gap stops it (and only it) for good."""
    if stream in halted:
        return None
    try:
        return step(stream)
    except Gap as gap:
        halted[stream] = str(gap)
        log.error("stream stopped", stream=stream, error=str(gap))
        outbox.stream_error(stream, redact(str(gap)))
        return None


def _sent(outbox: Outbox, streams: list[str], halted: dict[str, str]) -> bool:
    """Nothing waits for the streams still publishing (a stopped stream keeps its records for the replay)."""
    if not halted:
        return outbox.backlog() == 0
    return not any(outbox.pending(s, outbox.published_seq(s), 1) for s in streams if s not in halted)
