"""The seam between the loaders and a bus: read a batch, ack it, move a poison entry aside.

One implementation per bus, picked by the bus URL's scheme (`loaders/service.py`): Redis Streams consumer
groups (`loaders/redis_consumer.py`), a NATS JetStream durable pull consumer (`loaders/nats_consumer.py`) and a
RabbitMQ stream consumer with server-side offset tracking (`loaders/rabbitmq_consumer.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from bus.seam import BusDown, BusRefused
from loaders.records import Delivery

__all__ = ["BusDown", "BusRefused", "Consumer"]  # one error type for both ends: the relay's and the loaders'


class Consumer(Protocol):
    """One member of a consumer group on one or more streams."""

    @property
    def name(self) -> str: ...

    def read(self, count: int, block: float) -> list[Delivery]:
        """Up to `count` entries: first this member's own unacked ones (after a restart), then entries other
        members left pending longer than the claim idle time, then new ones (waiting up to `block` s)."""
        ...

    def pending(self) -> int:
        """Entries the group handed out (to any member) and nobody acked yet, plus (where the bus cannot tell
        them apart) entries not handed out yet: `--once` ends when this is 0 and a read found nothing."""
        ...

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Done with these: the group never hands them out again."""
        ...

    def dead_letter(self, delivery: Delivery, error: str) -> None:
        """Move the entry to its dead-letter stream with the error, this member's name and the delivery count,
        and ack it: the records behind it go on."""
        ...

    def newest_seq(self, stream: str) -> int:
        """The straw `seq` of the stream's newest record on the bus (0: none); a loader whose applied seq is
        above it is ahead of a bus that lost records in a failover, and waits for the publisher's repair."""
        ...

    def close(self) -> None: ...
