"""Run configured sources: poll -> map -> outbox, with the relay publishing alongside.

The poller and the relay share nothing but the outbox file: the relay runs in
its own process (a second core) with its own SQLite connection, so either side
can be down, or busy, while the other goes on.
"""

from __future__ import annotations

import contextlib
import gc
import heapq
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import redis
import structlog
from sqlalchemy.exc import SQLAlchemyError

from adapters.db.budget import DATABASES
from adapters.db.keys import BATCH as KEY_BATCH
from adapters.db.keys import list_keys
from adapters.db.poller import DbSource, SchemaDrift
from adapters.scrape.errors import ScrapeError
from bus.connect import open_bus
from bus.redis import REDIS_DOWN, connect
from bus.seam import BusDown, BusRefused
from outbox.lock import OutboxLock
from outbox.relay import adopt_streams
from outbox.store import IDLE_NOTES_EVERY, Outbox, OutboxError
from straw.config import AnySourceSpec, Config, DbSourceSpec
from straw.config_scrape import ScrapeSourceSpec
from straw.handover import Handed, handed
from straw.lease import Leases, LeaseStatus, drop_fenced, holders
from straw.mapping import DeadLetter, KeyedBatch, MappedBatch, Mapper, MappingError
from straw.records import DELETED, observed_now, source_uri
from straw.redact import describe
from straw.relay_process import RelayProcess
from straw.schedule import Schedule, schedule_of
from straw.source import RawBatch, Source

if TYPE_CHECKING:
    from straw.metrics import Metrics

log = structlog.get_logger("straw.runner")


@dataclass
class Pipeline:
    """One configured source with its mapper: the unit that polls."""

    spec: AnySourceSpec
    source: Source
    mapper: Mapper
    schedule: Schedule
    next_due: float = 0.0
    failures: int = 0
    restored: bool = False  # the source has had its memo back (`Source.restore`)

    def due_in(self, wall: float | None, now: float) -> float:
        """A wall-clock due time (None: never) as a monotonic one, `now` being monotonic."""
        return math.inf if wall is None else now + max(0.0, wall - time.time())


def build_mapper(config: Config, spec: AnySourceSpec) -> Mapper:
    return Mapper(
        source_uri=source_uri(config.instance, spec.name),
        source_name=spec.name,
        entity_name=spec.entity,
        entity=config.entities[spec.entity],
        mapping=spec.mapping,
        zone=spec.zone,
        encoding=spec.encoding,
        trim=getattr(spec, "trim_char", False),  # a DB source option: CHAR(n) padding
    )


def db_source(config: Config, spec: DbSourceSpec, mapper: Mapper) -> DbSource:
    return DbSource(
        spec, mapper.required_columns(), key_columns=mapper.key_columns(), database=config.database(spec.url),
        digest_salt=mapper.shape_id,
    )


def build_pipeline(config: Config, spec: AnySourceSpec) -> Pipeline:
    mapper = build_mapper(config, spec)
    if isinstance(spec, ScrapeSourceSpec):
        # Imported here: httpx, lxml and Playwright cost a DB-only installation 150 ms at every start.
        from adapters.scrape.source import ScrapeSource

        return Pipeline(spec, ScrapeSource(spec), mapper, schedule_of(spec))
    return Pipeline(spec, db_source(config, spec, mapper), mapper, schedule_of(spec))


def freeze_startup_objects() -> None:
    """Keep the cyclic garbage collector off what start-up built (modules, models, engines).

    A poll allocates a container per row; every few thousand rows the collector runs,
    and its full passes walked the hundred thousand objects of the imported libraries
    each time: a sixth of a snapshot diff's time. They live as long as the process,
    so they are moved out of its sight once, when the pipelines are built.
    """
    gc.freeze()


@dataclass
class Tally:
    """What polling one source did: rows read, events new in the outbox (upserted / deleted), dead letters."""

    rows: int = 0
    upserted: int = 0
    deleted: int = 0
    dead: int = 0

    def add(self, other: Tally) -> None:
        self.rows += other.rows
        self.upserted += other.upserted
        self.deleted += other.deleted
        self.dead += other.dead

    def summary(self) -> str:
        return (f"{self.rows} rows read, {self.upserted + self.deleted} events new "
                f"({self.upserted} upserted, {self.deleted} deleted), {self.dead} dead letters")


def poll(
    pipeline: Pipeline, outbox: Outbox, *, stop: Callable[[], bool] | None = None, tally: Tally | None = None,
    committed: Callable[[], None] | None = None,
) -> int:
    """Read everything after the stored position into the outbox, batch by batch; return rows read.

    `stop`: asked after each committed batch; when it says so, the poll ends there (the
    position stands after that batch, so the next poll goes on from it). `tally`: counts
    what the poll did. `committed`: called after each outbox commit that added records (the relay's wake-up).
    """
    spec = pipeline.spec
    rows = 0
    tally = tally if tally is not None else Tally()
    if not pipeline.restored:
        pipeline.source.restore(outbox.memo(spec.name))
        pipeline.restored = True
    batches = pipeline.source.read(outbox.position(spec.name))
    try:
        rows = _poll_batches(pipeline, outbox, batches, stop, tally, committed)
    finally:
        close = getattr(batches, "close", None)  # a stop leaves the read unfinished: release its cursor now
        if close is not None:
            close()
    if rows == 0:
        outbox.polled(spec.name)
    return rows


def _poll_batches(
    pipeline: Pipeline, outbox: Outbox, batches: Iterator[RawBatch], stop: Callable[[], bool] | None, tally: Tally,
    committed: Callable[[], None] | None,
) -> int:
    spec = pipeline.spec
    rows = 0
    for batch in batches:
        mapped: MappedBatch | KeyedBatch
        if batch.keyed:
            mapped = pipeline.mapper.map_keyed(batch, partial(outbox.digests, spec.name),
                                                partial(outbox.by_digest, spec.name))
            observed = observed_now()
            deleted = [0]
            written = outbox.append_keyed(
                spec.name,
                spec.stream,
                mapped.changes,
                [(d.position, d.reason, d.raw) for d in mapped.dead],
                batch.next_position,
                len(batch.rows),
                complete=batch.complete,
                encode=partial(_encode_counted, pipeline.mapper, observed, deleted),
                unchanged=[*mapped.unchanged_ids, *(id_ for _key, id_ in mapped.unchanged)],
                memo=batch.memo,
            )
            if batch.on_commit is not None:
                batch.on_commit()
            tally.upserted += written - deleted[0]
            tally.deleted += deleted[0]
            if written and committed is not None:
                committed()
        else:
            mapped = pipeline.mapper.map(batch)
            events = mapped.events
            if batch.late:  # behind the watermark: the checkpoint must stay at it (RawBatch.late)
                events = [(batch.next_position, event) for _position, event in events]
            outbox.append(
                spec.name,
                spec.stream,
                events,
                [(d.position, d.reason, d.raw) for d in mapped.dead],
                batch.next_position,
                len(batch.rows),
                batch.memo,
            )
            if batch.on_commit is not None:
                batch.on_commit()
            if mapped.events and committed is not None:
                committed()
            gone = _deletions(batch.ops, batch.positions, mapped.dead) if batch.ops is not None else 0
            tally.upserted += len(mapped.events) - gone
            tally.deleted += gone
        if mapped.dead:
            log.warning("rows sent to dead letters", source=spec.name, count=len(mapped.dead),
                        first_reason=mapped.dead[0].reason)
        rows += len(batch.rows)
        tally.rows += len(batch.rows)
        tally.dead += len(mapped.dead)
        if stop is not None and stop():
            break  # a stop takes effect here, at a batch boundary: this batch is committed
    return rows


def sweep_deletes(pipeline: Pipeline, outbox: Outbox, stop: threading.Event | None = None) -> int:
    """A source with `deletes`: keep its delivered keys, and run its key sweep when due; return deletes written.

    Called before each poll (it also turns on the recording of delivered keys). A failing
    sweep is logged and noted on the source, and retried at the next poll; it never
    keeps the poll from running. `stop` set: the listing stops after its current batch
    and resumes there next time.
    """
    spec, source = pipeline.spec, pipeline.source
    if not isinstance(spec, DbSourceSpec) or spec.deletes is None or not isinstance(source, DbSource):
        return 0
    key_columns = pipeline.mapper.key_columns()
    outbox.track_keys(spec.name, pipeline.mapper.entity.key)
    started = time.monotonic()
    try:
        sweep = outbox.sweep_begin(spec.name, spec.deletes.sweep_interval, time.time())
        if sweep is None:
            return 0
        listed = 0
        for rows, after in list_keys(source, key_columns, sweep.after, min(KEY_BATCH, 10 * spec.batch_size)):
            outbox.sweep_mark(spec.name, pipeline.mapper.key_subjects(rows), after)
            listed += len(rows)
            if stop is not None and stop.is_set():
                return 0
        encode = partial(_encode_counted, pipeline.mapper, observed_now(), [0])
        deleted = outbox.sweep_finish(spec.name, spec.stream, encode)
    except (OutboxError, *POLL_ERRORS) as exc:
        message = str(exc) if isinstance(exc, OutboxError) else describe(exc)
        log.error("key sweep failed; it resumes at the next poll", source=spec.name, error=message)
        with contextlib.suppress(OutboxError):  # the outbox itself failing: the poll reports it
            outbox.polled(spec.name, error=f"key sweep: {message}")
        return 0
    log.info("key sweep", source=spec.name, keys=listed, deleted=deleted, seconds=round(time.monotonic() - started, 3))
    return deleted


def _encode_counted(
    mapper: Mapper, time: str, deleted: list[int], op: str, key: str, position: str, data: dict[str, Any]
) -> bytes:
    if op == DELETED:
        deleted[0] += 1
    return mapper.encode(op, key, position, data, time)


def _deletions(ops: Sequence[str], positions: Sequence[str], dead: Sequence[DeadLetter]) -> int:
    """How many rows of a soft-delete batch became `deleted` events (dead letters do not)."""
    skipped = {d.position for d in dead}
    return sum(1 for op, pos in zip(ops, positions, strict=True) if op == DELETED and pos not in skipped)


# A failing source is reported and retried; it must not stop the other sources or the relay.
POLL_ERRORS = (SQLAlchemyError, SchemaDrift, ScrapeError, MappingError, OSError, ValueError, TypeError)

# How long a stopped run (SIGTERM/SIGINT) lets the relay publish what the outbox holds before exiting;
# what is left stays safe in the outbox for the next run.
STOP_GRACE = 2.0

# Driver messages that mean the database refused our credentials (PostgreSQL, MariaDB/MySQL, SQL Server, ODBC).
_AUTH_FAILED = ("password authentication failed", "access denied for user", "authentication failed",
                "login failed", "invalid authorization specification", "no pg_hba.conf entry")


def auth_failed(message: str) -> bool:
    lowered = message.lower()
    return any(hint in lowered for hint in _AUTH_FAILED)


@dataclass
class RunResult:
    rows_read: int = 0
    errors: list[str] = field(default_factory=list)
    backlog: int = 0
    tallies: dict[str, Tally] = field(default_factory=dict)  # per source, what this run did
    stopped: str | None = None  # the signal that stopped the run, if one did


class Runner:
    def __init__(self, config: Config, log_level: str | None = None) -> None:
        self.config = config
        self.stop = threading.Event()
        self.hurry = threading.Event()  # a second signal: do not wait for the relay
        self.stopped: str | None = None
        self.log_level = log_level
        self.metrics: Metrics | None = None
        self.leases: Leases | None = None  # with `lease:` configured: which streams this instance may poll
        self._wake_relay: Callable[[], None] | None = None  # the running relay's wake-up, once it is started

    def run(self, *, once: bool = False, wait: float = 30.0, wait_lock: float = 0.0) -> RunResult:
        """`once`: poll every source until caught up, publish everything, return.

        `wait` (once only): how long to keep retrying Redis before giving up with
        the records safe in the outbox. With `metrics` configured, /metrics is
        served for as long as this runs. The outbox is locked for the whole run
        (OutboxBusy if another process holds it `wait_lock` seconds on).
        """
        with OutboxLock(self.config.outbox.path, wait_lock):
            return self._serve(once, wait)

    def _serve(self, once: bool, wait: float) -> RunResult:
        spec = self.config.metrics
        if spec is None:
            return self._run(once, wait)
        # Imported only when asked for: prometheus_client adds 40 ms to every start.
        from straw.metrics import Metrics

        self.metrics = Metrics(self.config.outbox.path, [s.name for s in self.config.sources], self.config.streams)
        lease = LeaseStatus(self.config, lambda: self.leases) if self.config.lease is not None else None
        if lease is not None:
            self.metrics.registry.register(lease.collector())  # straw_lease_held
        try:
            server = self.metrics.serve(spec.host, spec.port, self.config, lease)
        except OSError as exc:
            return RunResult(errors=[f"metrics: cannot listen on {spec.host}:{spec.port}: {exc.strerror or exc}"])
        log.info("serving metrics", url=f"http://{spec.host}:{spec.port}/metrics")
        try:
            return self._run(once, wait)
        finally:
            server.stop()
            if lease is not None:
                lease.close()

    def _run(self, once: bool, wait: float) -> RunResult:
        config = self.config
        result = RunResult()
        # Rows of the relay's batch size: a publish round then reads one row (outbox/store.py).
        outbox = Outbox(config.outbox.path, row_records=config.relay.batch_size)
        pipelines = [build_pipeline(config, spec) for spec in config.sources]
        freeze_startup_objects()
        lease_client = self._lease_setup(outbox)
        relay = RelayProcess(config, self.log_level)
        relay.on_published = self.metrics.published if self.metrics is not None else None
        relay.start()
        self._wake_relay = relay.wake
        try:
            with _stop_on_signals(self):
                deadline = time.monotonic() + wait
                if once:
                    for pipeline in pipelines:
                        if self.stop.is_set():
                            break
                        stream_error = self._await_stream(outbox, pipeline.spec.stream, deadline, relay)
                        if stream_error is None and self.leases is not None:
                            stream_error = self._once_lease(outbox, pipelines, pipeline.spec.stream)
                        if stream_error is not None:
                            result.errors.append(f"{pipeline.spec.name}: {stream_error}")
                            continue
                        result.rows_read += self._catch_up(pipeline, outbox, result)
                    relay.drain()
                    self._await_relay(relay, wait)
                else:
                    self._loop(pipelines, outbox, result, relay)
                if self.stop.is_set():
                    self._grace(relay)
        finally:
            self.stop.set()
            relay.shutdown()
            if self.leases is not None:  # after the relay: a standby's claim would fence what it still sent
                self.leases.release()
            if lease_client is not None:
                lease_client.close()
            for pipeline in pipelines:
                pipeline.source.close()
            try:
                result.backlog = outbox.backlog()
            finally:
                outbox.close()
        result.stopped = self.stopped
        relay_error = relay.error()
        if relay_error is not None:
            if not any(relay_error in error for error in result.errors):  # refused credentials: said once
                result.errors.append(f"relay: {relay_error}")
        elif result.backlog and self.stopped is None:
            result.errors.append(
                f"{result.backlog} records wait in the outbox (Redis unreachable?); they are safe and "
                "will be published by the next run"
            )
        return result

    def _grace(self, relay: RelayProcess) -> None:
        """Stopped by a signal: let the relay publish what the outbox holds, for STOP_GRACE seconds at most."""
        relay.drain()
        deadline = time.monotonic() + STOP_GRACE
        while relay.is_alive() and not self.hurry.is_set() and time.monotonic() < deadline:
            relay.join(timeout=0.05)

    def _catch_up(self, pipeline: Pipeline, outbox: Outbox, result: RunResult) -> int:
        """Poll until a poll comes back short of `max_rows_per_poll` (or fails)."""
        limit = pipeline.spec.max_rows_per_poll
        total = 0
        while not self.stop.is_set():
            rows = self._poll_logged(pipeline, outbox, result)
            total += rows
            if not limit or rows < limit:
                break
        return total

    def _await_relay(self, relay: RelayProcess, wait: float) -> None:
        """Let the relay drain the outbox; give up only after Redis has been down for `wait` seconds."""
        while relay.is_alive() and not self.stop.is_set():
            relay.join(timeout=0.05)
            down = relay.down_since
            if down is not None and time.monotonic() - down > wait:
                return

    def _await_stream(self, outbox: Outbox, stream: str, deadline: float, relay: RelayProcess) -> str | None:
        """A new outbox must take the stream's checkpoint from Redis before its first poll; None once it has.

        We read it here rather than wait for the relay process to start and do it;
        if Redis is not there, the relay will adopt the stream once it is. Refused
        credentials are final: no use waiting for them.
        """
        if not outbox.stream_known(stream):
            spec = self.config.bus_spec
            bus = open_bus(spec.url, socket_timeout=min(spec.socket_timeout, 5.0), jetstream=spec.jetstream_options())
            try:
                adopt_streams(bus, outbox, [stream])
            except BusRefused as exc:
                return describe(exc)
            except BusDown:
                pass
            finally:
                bus.close()
        while not outbox.stream_known(stream):
            if self.stop.is_set() or time.monotonic() > deadline or not relay.is_alive():
                if relay.error() is not None:
                    return "stream not adopted: the relay stopped (below)"
                return (f"stream {stream!r} not adopted: Redis unreachable, and a new outbox must read the "
                        "stream's checkpoint first")
            time.sleep(0.02)
        return None

    def _poll_logged(self, pipeline: Pipeline, outbox: Outbox, result: RunResult) -> int:
        spec = pipeline.spec
        began = time.time()  # the next poll is due an interval after this one began (straw/schedule.py)
        sweep_deletes(pipeline, outbox, self.stop)
        started = time.monotonic()
        tally = Tally()
        try:
            rows = poll(pipeline, outbox, stop=self._stop_for(spec.stream), tally=tally, committed=self._wake_relay)
        except OutboxError as exc:
            # The outbox itself failed (full disk, read-only, damaged): nothing to note in it either.
            self._failed(pipeline, result, started, str(exc))
            return 0
        except POLL_ERRORS as exc:
            message = describe(exc)
            if auth_failed(message):
                message = f"database authentication failed ({message}); check the user and password in the url"
            self._failed(pipeline, result, started, message)
            with contextlib.suppress(OutboxError):
                outbox.polled(spec.name, error=message)
            return 0
        if self.metrics is not None:
            self.metrics.observe(spec.name, time.monotonic() - started, failed=False)
        pipeline.failures = 0
        limit = spec.max_rows_per_poll
        # A poll cut at its cap has more waiting: the next one is due at once (inside its window), not a
        # poll_interval or cron time later.
        capped = bool(limit and rows >= limit)
        due = pipeline.schedule.next_due(time.time(), capped=capped, started=began)
        pipeline.next_due = pipeline.due_in(due, time.monotonic())
        result.tallies.setdefault(spec.name, Tally()).add(tally)
        if tally.upserted or tally.deleted or tally.dead or self.config.log.polls == "all":
            log.info("polled", source=spec.name, rows=rows, upserted=tally.upserted, deleted=tally.deleted,
                     dead_letters=tally.dead, seconds=round(time.monotonic() - started, 3))
        elif rows:
            log.debug("polled; nothing new", source=spec.name, rows=rows)
        return rows

    def _failed(self, pipeline: Pipeline, result: RunResult, started: float, message: str) -> None:
        spec = pipeline.spec
        if self.metrics is not None:
            self.metrics.observe(spec.name, time.monotonic() - started, failed=True)
        pipeline.failures += 1
        delay = min(spec.poll_interval * 2**pipeline.failures, 300.0)
        # The retry waits for the source's window too: a failing source must not be polled out of hours.
        retry = pipeline.schedule.open_from(time.time() + delay)
        pipeline.next_due = pipeline.due_in(retry, time.monotonic())
        log.error("poll failed; position not advanced", source=spec.name, error=message, retry_in=round(delay, 1))
        result.errors.append(f"{spec.name}: {message}")

    def _loop(self, pipelines: list[Pipeline], outbox: Outbox, result: RunResult, relay: RelayProcess) -> None:
        """Poll each source when it is due, soonest first: a heap of due times, not a scan of every source.

        Polls run one after the other in due order, so a due source waits behind those due
        before it and no longer. Between polls there is one wait, to the soonest due time
        (at most a second: the relay's health and idle connections are looked at that often).
        """
        for pipeline in pipelines:
            pipeline.next_due = pipeline.due_in(pipeline.schedule.first_due(time.time()), time.monotonic())
        due = [(p.next_due, index) for index, p in enumerate(pipelines)]
        heapq.heapify(due)
        adopted: set[str] = set()
        while not self.stop.is_set():
            if not relay.is_alive():
                log.error("relay stopped; stopping", error=relay.error())
                return
            now = time.monotonic()
            if self.leases is not None:
                self._lease_tick(outbox, pipelines, due, now)
            while due and due[0][0] <= now and not self.stop.is_set():
                when, index = heapq.heappop(due)
                pipeline = pipelines[index]
                if when != pipeline.next_due:
                    continue  # superseded: the source was rescheduled (a lease taken)
                stream = pipeline.spec.stream
                if self.leases is not None and not self.leases.holds(stream, now):
                    pipeline.next_due = math.inf  # standing by: a taken lease schedules it again
                    continue
                if stream in adopted or outbox.stream_known(stream):
                    adopted.add(stream)
                    result.rows_read += self._poll_logged(pipeline, outbox, result)
                    result.errors.clear()  # in a long run, errors live in the log and in `straw status`
                else:  # the relay has not adopted the stream's checkpoint yet: look again shortly
                    pipeline.next_due = now + 0.2
                heapq.heappush(due, (pipeline.next_due, index))
            DATABASES.trim(time.monotonic())
            with contextlib.suppress(OutboxError):  # a failing outbox is reported by the next poll
                outbox.flush_polled(at_most_every=IDLE_NOTES_EVERY)
            wake = min(due[0][0] if due else math.inf, self.leases.next_try() if self.leases else math.inf)
            self.stop.wait(max(0.01, min(wake - time.monotonic(), 1.0)))

    # --- leases (straw/lease.py): one active instance per stream ---------------

    def _lease_setup(self, outbox: Outbox) -> redis.Redis | None:
        """With `lease:`: connect, and drop records a newer holder fenced, before the relay would trip on them."""
        spec = self.config.lease
        if spec is None:
            return None
        client = connect(self.config.bus_spec.url, socket_timeout=min(self.config.bus_spec.socket_timeout, 5.0))
        self.leases = Leases(client, spec, self.config.streams)
        threading.Thread(target=self.leases.renew_until, args=(self.stop,), name="lease-renewal", daemon=True).start()
        try:
            drop_fenced(client, outbox, self.config.streams)
        except REDIS_DOWN as exc:
            log.warning("lease: redis unreachable at start; fenced records are dropped once it is back",
                        error=type(exc).__name__)
        return client

    def _lease_tick(self, outbox: Outbox, pipelines: list[Pipeline], due: list[tuple[float, int]], now: float) -> None:
        assert self.leases is not None
        taken, lost = self.leases.tick(now)
        for stream in taken:
            try:
                if not self.leases.claim(outbox, stream, self._handed(pipelines, stream)):
                    continue
            except (*REDIS_DOWN, redis.RedisError, OutboxError) as exc:
                log.error("lease: claiming the stream failed; trying again", stream=stream, error=describe(exc))
                self.leases.drop(stream)
                continue
            for index, pipeline in enumerate(pipelines):
                if pipeline.spec.stream == stream:
                    pipeline.restored = False  # its position is the checkpoint's now: so is its memo (none)
                    pipeline.next_due = pipeline.due_in(pipeline.schedule.first_due(time.time()), now)
                    heapq.heappush(due, (pipeline.next_due, index))
        if lost:
            with contextlib.suppress(*REDIS_DOWN, redis.RedisError, OutboxError):
                drop_fenced(self.leases.client, outbox, lost)

    def _handed(self, pipelines: list[Pipeline], stream: str) -> list[Handed]:
        """The sources of `stream`, and which keyed state a takeover rebuilds for them."""
        return handed(self.config, [p.spec for p in pipelines if p.spec.stream == stream])

    def _once_lease(self, outbox: Outbox, pipelines: list[Pipeline], stream: str) -> str | None:
        """`run --once` with `lease:`: poll a stream only if its lease is free (or ours); None when it is."""
        assert self.leases is not None
        if not self.leases.holds(stream):
            taken, _lost = self.leases.tick(time.monotonic())
            for other in taken:  # every stream taken is claimed before any of its sources polls
                if not self.leases.claim(outbox, other, self._handed(pipelines, other)):
                    self.leases.drop(other)
            if not self.leases.holds(stream):
                holder = holders(self.leases.client, [stream]).get(stream)
                return f"stream {stream!r} is leased by node {holder}; not polled"
        return None

    def _stop_for(self, stream: str) -> Callable[[], bool]:
        """What ends a poll at its next batch boundary: a stop, or (with leases) the stream's lease lapsing."""
        leases = self.leases
        if leases is None:
            return self.stop.is_set
        return lambda: self.stop.is_set() or not leases.holds(stream)


@contextmanager
def _stop_on_signals(runner: Runner) -> Iterator[None]:
    """SIGTERM/SIGINT: stop at the next batch boundary (each batch is its own transaction), let the
    relay publish for a moment, exit; a second signal cuts that moment short."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if runner.stop.is_set():
            runner.hurry.set()
            return
        log.info("stopping at the next batch boundary", signal=name)
        runner.stopped = name
        runner.stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
