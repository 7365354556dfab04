"""`straw load NAME`: one loader of the configuration, its consumer on the bus, until stopped or drained."""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from types import FrameType
from typing import TYPE_CHECKING, Protocol

import redis
from sqlalchemy import select

from bus.names import JetStreamOptions, bus_kind
from loaders import collector
from loaders.consumer import Consumer
from loaders.dead_letters import DeadLetterStore, open_dead_letters
from loaders.records import BadRecord, Delivery, Record, parse
from loaders.redis_consumer import RedisConsumer
from loaders.sdk import Apply, Failed, Settings, Tally, TargetDown, consume
from straw.config import Config
from straw.config_loaders import AnyLoaderSpec, JsonlLoaderSpec
from straw.redact import describe, redact

if TYPE_CHECKING:
    from loaders.metrics import LoaderMetrics


class Target(Protocol):
    def apply(self, records: Sequence[Record]) -> Sequence[Failed]: ...
    def close(self) -> None: ...


def single_member(spec: AnyLoaderSpec | None) -> bool:
    """A JSON Lines loader is its group's only member (one process per directory), and writes in stream order,
    as its skip of `seq`s on disk needs: it keeps one name, and takes over what an earlier run held first."""
    return isinstance(spec, JsonlLoaderSpec)


def consumer_name(spec: AnyLoaderSpec | None = None) -> str:
    """Unique per process: two loaders on one host must not share a pending list. A single member is named after
    its loader: a restart finds its own pending entries again."""
    host = socket.gethostname().split(".")[0] or "loader"
    if spec is not None and single_member(spec):
        return f"{host}-{spec.name}"
    return f"{host}-{os.getpid()}"


def redis_client(url: str, socket_timeout: float) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=socket_timeout, socket_connect_timeout=min(socket_timeout, 5.0),
                                health_check_interval=30)


def refused_line(exc: BaseException) -> str:
    """One line for refused credentials: waiting does not fix a password."""
    detail = " ".join(str(exc).split())
    if isinstance(exc, redis.exceptions.NoPermissionError):
        return (f"Redis authorization failed ({detail}): the ACL user of redis.url needs +@read +@write +@stream "
                "on the loader's streams, their dead-letter streams and the consumer groups")
    return f"Redis authentication failed ({detail}): check the user and password in redis.url"


def redis_consumer(config: Config, spec: AnyLoaderSpec, name: str | None = None) -> RedisConsumer:
    bus = config.bus_spec
    client = redis_client(bus.url, max(bus.socket_timeout, spec.block + 5.0))
    return RedisConsumer(
        client, spec.streams, spec.group_name, name or consumer_name(spec), claim_idle=spec.claim_idle,
        dead_letters=spec.dead_letters_of, start=spec.start, adopt=single_member(spec),
    )


def open_dead_letter_store(config: Config) -> DeadLetterStore:
    """The dead-letter streams of the configured bus, as `straw dlq` uses them."""
    bus = config.bus_spec
    return open_dead_letters(bus.url, bus.jetstream_options(), lambda: redis_client(bus.url, 5.0), bus_kind(bus.url))


def open_consumer(config: Config, spec: AnyLoaderSpec, name: str | None = None) -> Consumer:
    """The loader's member on the configured bus, picked by the bus URL's scheme (as the relay's bus is)."""
    bus = config.bus_spec
    kind = bus_kind(bus.url)
    member = name or consumer_name(spec)
    if kind == "nats":
        from loaders.nats_consumer import NatsConsumer

        return NatsConsumer(bus.url, bus.jetstream_options() or JetStreamOptions(), spec.streams, spec.group_name,
                            member, claim_idle=spec.claim_idle, max_deliveries=spec.max_deliveries,
                            dead_letters=spec.dead_letters_of, start=spec.start,
                            timeout=max(bus.socket_timeout, spec.block + 5.0), adopt=single_member(spec))
    if kind == "rabbitmq":
        from loaders.rabbitmq_consumer import RabbitConsumer

        return RabbitConsumer(bus.url, spec.streams, spec.group_name, member, claim_idle=spec.claim_idle,
                              dead_letters=spec.dead_letters_of, start=spec.start,
                              timeout=max(bus.socket_timeout, spec.block + 5.0))
    return redis_consumer(config, spec, member)


def open_target(config: Config, spec: AnyLoaderSpec) -> Target:
    if isinstance(spec, JsonlLoaderSpec):
        from loaders.jsonl import JsonlLoader

        return JsonlLoader(spec)
    from loaders.sql import SqlLoader

    return SqlLoader(spec, config.entities)


def settings_of(spec: AnyLoaderSpec) -> Settings:
    # JSON Lines' apply is this process's CPU and a short fsync: a second thread would only take turns with it
    # (bench/README.md, Session 7 — jsonl-rate2); a database's round trips are worth a thread's overlap.
    return Settings(batch_size=spec.batch_size, block=spec.block, max_deliveries=spec.max_deliveries,
                    claim_idle=spec.claim_idle,
                    read_ahead="pipelined" if isinstance(spec, JsonlLoaderSpec) else "thread")


@contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """SIGTERM/SIGINT set the event: the batch in hand is applied and acked, then the loop ends."""
    stop = threading.Event()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def applied_of(target: Target) -> Callable[[str], int]:
    """The target's last applied seq of a stream (0: none yet), for the check against the bus's newest."""
    from loaders.jsonl import JsonlLoader
    from loaders.sql import SqlLoader, transient

    if isinstance(target, SqlLoader):
        sql = target

        def from_table(stream: str) -> int:
            try:
                with sql.engine.connect() as conn:
                    found = conn.execute(select(sql.applied.c.seq).where(sql.applied.c.stream == stream)).first()
            except Exception as exc:
                if transient(exc):
                    raise TargetDown(describe(exc)) from exc
                return 0  # no straw_applied yet: nothing applied
            return int(found[0]) if found else 0

        return from_table
    if isinstance(target, JsonlLoader):
        last: dict[str, int] = target._last  # what its files end with (recovered at open, kept current)
        return lambda stream: last.get(stream, 0)
    return lambda stream: 0


def apply_dead_letter(config: Config, fields: dict[str, str]) -> str:
    """Apply one dead letter to its loader's target here (on a bus whose stream cannot take it back): applied
    unless the target holds a newer change of its key; "still ..." says why not."""
    stream, group = fields.get("stream", ""), fields.get("group", "")
    spec = next((s for s in config.loaders if s.group_name == group and stream in s.streams), None)
    if spec is None:
        return f"still not applied: no loader of group {group!r} on {stream!r} is configured any more; drop it"
    delivery = Delivery(stream, fields.get("entry", ""), {**fields, "retry": "1"}, 1)
    try:
        record = parse(delivery, config.entities)
    except BadRecord as exc:
        return f"still cannot be applied: {exc}"
    from loaders.jsonl import DirectoryBusy

    try:
        target = open_target(config, spec)
    except DirectoryBusy:
        return (f"still not applied: loader {spec.name} is running on its directory (one process at a time): stop "
                "it, run this again, then start it")
    try:
        failed = target.apply([record])
    except TargetDown as exc:
        return (f"still not applied: the target of loader {spec.name} is unreachable ({redact(str(exc))}); run this "
                "again later")
    finally:
        target.close()
    if failed:
        return f"still cannot be applied: {failed[0].error}"
    return f"applied to the target of loader {spec.name} (seq {record.seq})"


def run_loader(
    config: Config, spec: AnyLoaderSpec, *, once: bool, stop: threading.Event, consumer: Consumer | None = None
) -> Tally:
    target = open_target(config, spec)
    member = consumer or open_consumer(config, spec)
    apply: Apply = target.apply
    applied = applied_of(target)
    tally: Tally | None = None
    metrics: LoaderMetrics | None = None
    try:
        if spec.metrics is not None:
            metrics = loader_metrics(config, spec, applied)
            apply, tally = metrics.metered(target.apply), metrics.tally
        collector.settle()  # the start's objects frozen, young passes spaced out: a third of the parse per record
        return consume(member, apply, config.entities, settings_of(spec), stop=stop, once=once,
                       applied=applied, streams=spec.streams, tally=tally)
    finally:
        if metrics is not None:
            metrics.close()
        member.close()
        target.close()


def loader_metrics(config: Config, spec: AnyLoaderSpec, applied: Callable[[str], int]) -> LoaderMetrics:
    """The loader's metrics, served on `spec.metrics`, the lag counted from what the target applied already."""
    from loaders.metrics import LoaderMetrics

    assert spec.metrics is not None
    metrics = LoaderMetrics(config, spec)
    for stream in spec.streams:
        with suppress(TargetDown):  # else known after the first batch
            metrics.applied[stream] = applied(stream)
    metrics.serve(spec.metrics)
    return metrics
