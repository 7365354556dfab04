"""The seam between the loaders and a bus: read a batch, ack it, move a poison entry aside.

Redis Streams consumer groups are the first implementation (`loaders/redis_consumer.py`); a NATS JetStream
durable consumer or a RabbitMQ Streams offset tracker slots in behind the same four methods.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from loaders.records import Delivery


class BusDown(Exception):
    """The bus cannot be reached right now: nothing was read, acked or moved; try again later."""


class Consumer(Protocol):
    """One member of a consumer group on one or more streams."""

    @property
    def name(self) -> str: ...

    def read(self, count: int, block: float) -> list[Delivery]:
        """Up to `count` entries: first this member's own unacked ones (after a restart), then entries other
        members left pending longer than the claim idle time, then new ones (waiting up to `block` s)."""
        ...

    def pending(self) -> int:
        """Entries the group handed out (to any member) and nobody acked yet."""
        ...

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Done with these: the group never hands them out again."""
        ...

    def dead_letter(self, delivery: Delivery, error: str) -> None:
        """Move the entry to its dead-letter stream with the error, this member's name and the delivery count,
        and ack it: the records behind it go on."""
        ...

    def close(self) -> None: ...
