"""`straw load NAME`: one loader of the configuration, its consumer on the bus, until stopped or drained."""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import Protocol

import redis

from loaders import collector
from loaders.consumer import Consumer
from loaders.records import Record
from loaders.redis_consumer import RedisConsumer
from loaders.sdk import Failed, Settings, Tally, consume
from straw.config import Config
from straw.config_loaders import AnyLoaderSpec, JsonlLoaderSpec


class Target(Protocol):
    def apply(self, records: Sequence[Record]) -> Sequence[Failed]: ...
    def close(self) -> None: ...


def consumer_name() -> str:
    """Unique per process: two loaders on one host must not share a pending list."""
    return f"{socket.gethostname().split('.')[0] or 'loader'}-{os.getpid()}"


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
    client = redis_client(config.redis.url, max(config.redis.socket_timeout, spec.block + 5.0))
    return RedisConsumer(
        client, spec.streams, spec.group_name, name or consumer_name(), claim_idle=spec.claim_idle,
        dead_letters=spec.dead_letters_of, start=spec.start,
    )


def open_target(config: Config, spec: AnyLoaderSpec) -> Target:
    if isinstance(spec, JsonlLoaderSpec):
        from loaders.jsonl import JsonlLoader

        return JsonlLoader(spec)
    from loaders.sql import SqlLoader

    return SqlLoader(spec, config.entities)


def settings_of(spec: AnyLoaderSpec) -> Settings:
    return Settings(batch_size=spec.batch_size, block=spec.block, max_deliveries=spec.max_deliveries,
                    claim_idle=spec.claim_idle)


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


def run_loader(
    config: Config, spec: AnyLoaderSpec, *, once: bool, stop: threading.Event, consumer: Consumer | None = None
) -> Tally:
    target = open_target(config, spec)
    member = consumer or redis_consumer(config, spec)
    collector.settle()  # the start's objects frozen, young passes spaced out: a third of the parse per record
    try:
        return consume(member, target.apply, config.entities, settings_of(spec), stop=stop, once=once)
    finally:
        member.close()
        target.close()
