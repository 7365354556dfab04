"""Age-based retention of the streams: `XTRIM <stream> MINID ~ <now - max_age>`, now and then.

A stream entry's ID starts with the milliseconds of its XADD, so "older than
max_age" is "ID below (now - max_age) in ms"; `~` lets Redis cut whole
radix-tree nodes only, which costs next to nothing (a few entries more than
asked may stay). It runs apart from the publish script: the trim neither
slows nor complicates the exactly-once step, and a stream is trimmed even
while nothing new is published to it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import structlog

from bus.seam import Bus

if TYPE_CHECKING:
    import redis

log = structlog.get_logger("straw.retention")


class Trimmer:
    """Trims each stream that has a `max_age` at most once per `interval` seconds; call it after each round."""

    def __init__(
        self, ages: Mapping[str, float], interval: float = 60.0, clock: Callable[[], float] = time.time
    ) -> None:
        self.ages = dict(ages)
        self.interval = interval
        self.clock = clock
        self._next = 0.0

    def __call__(self, bus: Bus) -> None:
        now = self.clock()
        # Only Redis streams are trimmed by straw; JetStream and RabbitMQ streams keep their own max age.
        # A RedisBus exists only once bus.redis is loaded: the relay of a NATS or RabbitMQ site never loads
        # redis-py (a third of its start-up CPU) just for this check.
        redis_bus = sys.modules.get("bus.redis")
        if not self.ages or now < self._next or redis_bus is None or not isinstance(bus, redis_bus.RedisBus):
            return
        for stream, age in self.ages.items():
            with redis_bus.translated():
                trimmed = trim(bus.client, stream, age, now)
            if trimmed:
                log.info("trimmed stream", stream=stream, entries=trimmed, max_age_seconds=age)
        self._next = now + self.interval


def trim(client: redis.Redis, stream: str, max_age: float, now: float | None = None) -> int:
    """Remove the entries of `stream` older than `max_age` seconds (approximately); return how many went."""
    cutoff = int(((time.time() if now is None else now) - max_age) * 1000)
    return int(client.xtrim(stream, minid=f"{max(cutoff, 0)}-0", approximate=True))
