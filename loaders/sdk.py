"""The consume loop: read a batch, hand typed records to the loader, ack what it applied.

A record the loader cannot apply stays pending and comes back after `claim_idle`; at its `max_deliveries`-th
failed delivery it goes to the dead-letter stream, so a poison record never blocks the records behind it.
A target that is down (`TargetDown`) is not the records' fault: the same batch is retried with backoff and no
delivery is counted.

With a backlog, a consumer that can (`read_ahead`, Redis) reads and parses the next batch in a second thread
while the target applies this one: the target's wait (a database round trip, an fsync) is no longer the
reader's. Batches are still applied one after the other in stream order, and each acked only once applied.
A target whose apply is mostly this process's own CPU (JSON Lines: a write and an fsync) gains nothing from a
second thread but pays for it (the two threads take turns on the interpreter): with `read_ahead="pipelined"` a
consumer that can (Redis) sends the next read before the target applies this batch and takes its reply after,
in one thread, the ack of a batch travelling with the next read.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Protocol, cast

import structlog

from loaders.consumer import BusDown, Consumer
from loaders.records import BadRecord, Delivery, Record, parse
from loaders.repair import wait_for_repair
from straw.config import EntitySpec
from straw.redact import redact

log = structlog.get_logger("straw.loader")


class Failed(NamedTuple):
    record: Record
    error: str


class TargetDown(Exception):
    """The target cannot be reached (or is busy): retry the same batch later, count no delivery."""


BUS_BACKOFF_MAX = 5.0  # a bus back from an outage is noticed within this long

# A loader applies a batch and names the records it could not apply (an empty list: all applied).
Apply = Callable[[Sequence[Record]], Sequence[Failed]]

# A consumer's optional `read_ahead(count)`: new entries for the batch after the one in hand, without waiting,
# or None when the next read must be a plain `read` (one that could hand out the entries in hand again).
ReadAhead = Callable[[int], list[Delivery] | None]


class SplitPhase(Protocol):
    """A consumer's optional split-phase commands (`read_ahead="pipelined"`): send now, take the replies later."""

    def send_read_ahead(self, count: int) -> bool: ...  # False: nothing sent, the next read must be `read`
    def send_ack(self, deliveries: Sequence[Delivery]) -> None: ...
    def collect(self) -> list[Delivery] | None: ...  # every reply, in order; the read's entries (None: no read)


class _Batch(NamedTuple):
    """Deliveries read and parsed, not applied yet."""

    deliveries: list[Delivery]
    records: list[Record]
    failed: list[tuple[Delivery, str]]  # unparseable, or delivered too often: never handed to the loader


def each(handle: Callable[[Record], None]) -> Apply:
    """A per-record function as a batch loader: a record whose call raises is a failed one."""

    def apply(records: Sequence[Record]) -> list[Failed]:
        failed = []
        for record in records:
            try:
                handle(record)
            except TargetDown:
                raise
            except Exception as exc:
                failed.append(Failed(record, f"{type(exc).__name__}: {exc}"))
        return failed

    return apply


@dataclass
class Tally:
    applied: int = 0  # records handed to the loader and not failed (skipped duplicates included)
    failed: int = 0  # failed deliveries (each retry counts)
    dead_letters: int = 0
    batches: int = 0
    stopped: bool = False
    pending: set[tuple[str, str]] = field(default_factory=set)  # failed, waiting for their next delivery
    behind: dict[str, tuple[int, int]] = field(default_factory=dict)  # stream -> (applied, bus newest): waiting


@dataclass(frozen=True)
class Settings:
    batch_size: int = 500
    block: float = 2.0
    max_deliveries: int = 5
    claim_idle: float = 60.0
    backoff_max: float = 30.0
    give_up_after: float = 30.0  # with `once`: how long the bus or the target may be down before the run fails
    # With a backlog, how the next batch is read while the target applies this one: "thread" reads and parses it
    # in a second thread (pays when the target waits, a database); "pipelined" sends the read before the apply
    # and takes the reply after, one thread (pays when the apply is CPU, JSON Lines). Either falls back to
    # plain reads on a consumer that cannot (NATS, RabbitMQ).
    read_ahead: Literal["thread", "pipelined"] = "thread"


class _Outage:
    """How long the bus has been failing, and the next wait: 0.5 s, doubling, at most BUS_BACKOFF_MAX."""

    def __init__(self, settings: Settings, once: bool) -> None:
        self.settings, self.once = settings, once
        self.since: float | None = None
        self.pause = 0.0

    def over(self) -> None:
        self.since, self.pause = None, 0.0

    def wait(self, exc: BusDown) -> float:
        """The seconds to wait before the next try; with `once`, the error again after `give_up_after`."""
        self.since = self.since or time.monotonic()
        if self.once and time.monotonic() - self.since > self.settings.give_up_after:
            raise exc
        self.pause = min(self.pause * 2, BUS_BACKOFF_MAX) if self.pause else 0.5
        log.warning("bus unreachable, retrying", error=redact(str(exc)), retry_in=self.pause)
        return self.pause


def consume(
    consumer: Consumer,
    apply: Apply,
    entities: Mapping[str, EntitySpec],
    settings: Settings,
    *,
    stop: threading.Event | None = None,
    once: bool = False,
    applied: Callable[[str], int] | None = None,
    streams: Sequence[str] = (),
    tally: Tally | None = None,
) -> Tally:
    """Run until `stop` is set (the batch in hand, and one read ahead for it, are finished and acked first), or
    with `once` until the streams are drained: every entry there now applied or dead-lettered. With `applied`
    (the target's last applied seq of a stream), first, and after each outage of the bus, wait while the bus
    is behind it. Counts go into `tally` if given (a metrics endpoint reads it while the loop runs)."""
    stop = stop or threading.Event()
    tally = tally if tally is not None else Tally()
    outage = _Outage(settings, once)
    check = applied is not None
    pipelined = settings.read_ahead == "pipelined" and hasattr(consumer, "collect")
    with (_Pipelined if pipelined else _Pipeline)(consumer, entities, settings, tally) as pipeline:
        # A batch read ahead is applied even after `stop`: it is in hand, like the one before it.
        while not stop.is_set() or pipeline.reading:
            try:
                batch = pipeline.taken()
                if batch is None:
                    pipeline.settle()  # a plain read may reclaim, and `pending` counts, what is not acked yet
                    if check and applied is not None:
                        try:
                            wait_for_repair(consumer, applied, streams, tally.behind, stop,
                                            poll=min(max(settings.block, 0.2), 5.0),
                                            give_up_after=settings.give_up_after if once else None)
                        except TargetDown as exc:  # cannot compare yet: the target says where it stands once up
                            log.warning("target unreachable, retrying", error=redact(str(exc)))
                            stop.wait(1.0)
                            continue
                        check = False
                    if stop.is_set():
                        break
                    deliveries = consumer.read(settings.batch_size, 0.0 if once else settings.block)
                    # Drained when nothing is pending in the group either: entries that failed here or that a
                    # dead member holds come back after claim_idle, and a live member's are acked in a moment.
                    # (Not our own failed set: another member may have claimed and settled those.)
                    if once and not deliveries and consumer.pending() == 0:
                        tally.pending.clear()
                        break
                    if not deliveries:
                        outage.over()
                        if once:
                            stop.wait(min(0.02 + settings.claim_idle / 4, 1.0))
                        continue
                    batch = _parsed(deliveries, entities, settings)
                # A full batch says there is a backlog: read the next one while this one is applied.
                if len(batch.deliveries) >= settings.batch_size and not stop.is_set():
                    pipeline.read_next()
                # A bus lost while acking: applied, not acked; the records come back and the target skips them.
                _batch(consumer, apply, settings, batch, tally, stop, once, pipeline.ack)
                outage.over()
            except BusDown as exc:
                pipeline.drop()  # read ahead, never applied: reclaimed after claim_idle, as any unacked entry
                check = applied is not None  # after a reconnect the bus may be another (a promoted replica)
                stop.wait(outage.wait(exc))
    tally.stopped = stop.is_set()
    return tally


class _Pipeline:
    """A second thread for a consumer that can read ahead: it reads and parses the next batch while the target
    applies this one, then acks this one while the target applies the next. One thread, so its jobs run in
    the order given; the ack of a batch is only given once the batch is applied. Without `read_ahead`, the
    consumer is only called from the caller's thread, as before (NATS's and RabbitMQ's clients)."""

    def __init__(self, consumer: Consumer, entities: Mapping[str, EntitySpec], settings: Settings,
                 tally: Tally) -> None:
        self.consumer, self.entities, self.settings, self.tally = consumer, entities, settings, tally
        self._read_ahead: ReadAhead | None = getattr(consumer, "read_ahead", None)
        self._thread = (ThreadPoolExecutor(1, thread_name_prefix="straw-read-ahead")
                        if self._read_ahead is not None else None)
        self.ahead: Future[_Batch | None] | None = None
        self._acking: Future[None] | None = None
        self._acked: list[Delivery] = []

    def __enter__(self) -> _Pipeline:
        return self

    @property
    def reading(self) -> bool:
        """A batch is being read ahead: it is applied before the loop ends, even after a stop."""
        return self.ahead is not None

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                with contextlib.suppress(BusDown):  # applied, not acked: they come back and are skipped
                    self.settle()
            else:
                self.drop()
        finally:
            if self._thread is not None:
                self._thread.shutdown(wait=True)

    def read_next(self) -> None:
        if self._thread is not None:
            self.ahead = self._thread.submit(self._read_parsed, self._read_ahead)

    def _read_parsed(self, read_ahead: ReadAhead | None) -> _Batch | None:
        deliveries = read_ahead(self.settings.batch_size) if read_ahead is not None else None
        return _parsed(deliveries, self.entities, self.settings, yielding=True) if deliveries else None

    def taken(self) -> _Batch | None:
        """The batch read ahead (None: none, or it found nothing new: read as usual)."""
        ahead, self.ahead = self.ahead, None
        return ahead.result() if ahead is not None else None

    def ack(self, done: list[Delivery]) -> None:
        if self._thread is None:
            self.consumer.ack(done)
            _count(self.tally, done)
            return
        self.settle()
        self._acking, self._acked = self._thread.submit(self.consumer.ack, done), done

    def settle(self) -> None:
        """Wait for the ack in flight; its BusDown is raised here."""
        acking, self._acking = self._acking, None
        if acking is not None:
            acking.result()
            _count(self.tally, self._acked)

    def drop(self) -> None:
        """Wait for what is in flight and forget it (its entries stay pending and come back)."""
        for job in (self.ahead, self._acking):
            if job is not None:
                with contextlib.suppress(Exception):  # the error that ended the batch in hand is the one to report
                    job.result()
        self.ahead = self._acking = None


class _Pipelined:
    """The read ahead of `_Pipeline` in the caller's thread, for a consumer with split-phase commands
    (`send_read_ahead`, `send_ack`, `collect`: loaders/redis_consumer.py). The next batch's read is sent before
    this one is applied and its reply taken after; the ack of a batch is sent once it is applied and its reply
    taken with the next read's (or by `settle`, before any plain read, `pending()` and at exit). A batch is
    counted applied once its ack's reply came back."""

    def __init__(self, consumer: Consumer, entities: Mapping[str, EntitySpec], settings: Settings,
                 tally: Tally) -> None:
        self.consumer, self.entities, self.settings, self.tally = consumer, entities, settings, tally
        split = cast(SplitPhase, consumer)  # `consume` picks this class only for a consumer with `collect`
        self._send_read, self._send_ack, self._collect = split.send_read_ahead, split.send_ack, split.collect
        self.reading = False
        self._acked: list[list[Delivery]] = []  # acks sent, replies not taken yet

    def __enter__(self) -> _Pipelined:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            with contextlib.suppress(BusDown):  # applied, not acked: they come back and are skipped
                self.settle()
        else:
            self.drop()

    def read_next(self) -> None:
        self.reading = self._send_read(self.settings.batch_size)

    def taken(self) -> _Batch | None:
        if not self.reading:
            return None
        self.reading = False
        deliveries = self._replies()
        return _parsed(deliveries, self.entities, self.settings) if deliveries else None

    def ack(self, done: list[Delivery]) -> None:
        self._send_ack(done)
        self._acked.append(done)

    def settle(self) -> None:
        """Take the acks' replies in flight. The loop takes a read's batch (`taken`) before it settles, so no read
        is in flight here; were one, its entries would stay pending for this member, as after `drop`."""
        if self._acked or self.reading:
            self.reading = False
            self._replies()

    def _replies(self) -> list[Delivery] | None:
        acked, self._acked = self._acked, []
        deliveries = self._collect()
        for done in acked:
            _count(self.tally, done)
        return deliveries

    def drop(self) -> None:
        """Forget what is in flight (its entries stay pending and come back)."""
        self.reading, self._acked = False, []
        with contextlib.suppress(Exception):  # the error that ended the batch in hand is the one to report
            self._collect()


def _count(tally: Tally, done: list[Delivery]) -> None:
    tally.applied += len(done)
    if tally.pending:
        for delivery in done:
            tally.pending.discard((delivery.stream, delivery.entry_id))


# In the second thread, parsing yields the interpreter every this many records: the thread applying waits for
# its database or its fsync without the interpreter, and when that returns it would otherwise wait for the
# parser's whole switch interval (5 ms, measured 5-15 ms on a busy machine) before it may go on. Each yield
# costs a thread switch when the other thread is waiting: every 32 records cost ~1 µs of CPU a record
# (bench/README.md, Session 6 — loader-rate); 128, four a batch of 500, bound the wait to about 0.5 ms.
YIELD_EVERY = 128


def _parsed(deliveries: list[Delivery], entities: Mapping[str, EntitySpec], settings: Settings,
            *, yielding: bool = False) -> _Batch:
    records: list[Record] = []
    failed: list[tuple[Delivery, str]] = []
    append, most = records.append, settings.max_deliveries  # looked up once a batch, not once a record
    for index, delivery in enumerate(deliveries):
        if yielding and not index % YIELD_EVERY:
            time.sleep(0)
        if delivery.deliveries > most:
            # Delivered more often than allowed without a verdict: a consumer died applying it, each time.
            failed.append((delivery, f"delivered {delivery.deliveries} times and never acked (did a consumer "
                                     "die applying it?)"))
            continue
        try:
            append(parse(delivery, entities))
        except BadRecord as exc:
            failed.append((delivery, str(exc)))
    return _Batch(deliveries, records, failed)


def _batch(
    consumer: Consumer,
    apply: Apply,
    settings: Settings,
    batch: _Batch,
    tally: Tally,
    stop: threading.Event,
    once: bool,
    ack: Callable[[list[Delivery]], None],
) -> None:
    tally.batches += 1
    deliveries, records, failed = batch.deliveries, batch.records, list(batch.failed)
    verdicts = _apply_until_reached(apply, records, settings, stop, once)
    if verdicts is None:  # stopped while the target was down: leave the batch pending for the next run
        return
    done = deliveries
    if verdicts:
        by_id = {(d.stream, d.entry_id): d for d in deliveries}
        failed.extend((by_id[(f.record.stream, f.record.entry_id)], f.error) for f in verdicts)
    if failed:  # the common batch has none: no key per record to build and look up
        failed_ids = {(d.stream, d.entry_id) for d, _ in failed}
        done = [d for d in deliveries if (d.stream, d.entry_id) not in failed_ids]
    if done:
        ack(done)
    for delivery, error in failed:
        error = redact(error)
        tally.failed += 1
        key = (delivery.stream, delivery.entry_id)
        if delivery.deliveries >= settings.max_deliveries:
            consumer.dead_letter(delivery, error)
            tally.dead_letters += 1
            tally.pending.discard(key)
            log.warning("dead letter", stream=delivery.stream, entry=delivery.entry_id,
                        deliveries=delivery.deliveries, error=error)
        else:
            tally.pending.add(key)
            log.info("not applied, will retry", stream=delivery.stream, entry=delivery.entry_id,
                     deliveries=delivery.deliveries, error=error)


def _apply_until_reached(
    apply: Apply, records: list[Record], settings: Settings, stop: threading.Event, once: bool
) -> Sequence[Failed] | None:
    if not records:
        return []
    wait = 0.1
    began = time.monotonic()
    while True:
        try:
            return apply(records)
        except TargetDown as exc:
            if once and time.monotonic() - began > settings.give_up_after:
                raise
            log.warning("target unreachable, retrying", error=redact(str(exc)), retry_in=round(wait, 2))
        if stop.wait(wait):
            return None
        wait = min(wait * 2, settings.backoff_max)
