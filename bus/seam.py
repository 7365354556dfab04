"""The one protocol every bus implements, and what crosses it.

The relay's exactly-once rule needs three things of a bus, whatever it is:
a per-stream checkpoint (the last outbox `seq` on the bus, the outbox that
wrote it, each source's position at that point); a publish that appends a
batch only if the checkpoint is still the one the relay last saw (so a stale
or second publisher is fenced, and a lost reply is settled by re-reading the
checkpoint, never by resending); and errors sorted into "wait and retry"
(`BusDown`) and "waiting will not help" (`BusRefused`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import orjson


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """Where a stream stands on the bus: nothing published is `Checkpoint()`."""

    seq: int = 0
    outbox: str | None = None  # identity of the outbox that published `seq`
    positions: dict[str, str] = field(default_factory=dict)  # source -> position of its last record on the bus


@dataclass(frozen=True, slots=True)
class Durability:
    """What a publish waits for before the relay marks its records published (`bus.durability`)."""

    level: str = "ack"  # ack | replicated | fsync; each bus says what it does for each
    replicas: int = 1
    timeout: float = 5.0  # seconds; then the publish fails as `BusDown` (retried)


class Outgoing(NamedTuple):
    """One outbox record on its way to the bus (`outbox.store.Pending` has this shape)."""

    seq: int
    source: str
    position: str
    event: bytes  # the CloudEvent, structured JSON


def positions_text(positions: dict[str, str]) -> str:
    """A checkpoint's positions as the buses that carry them per message write them: compact JSON in ASCII
    (\\uXXXX escapes), so any legacy key text, CR/LF included, survives a header or a property."""
    fast = orjson.dumps(positions).decode()  # escapes control characters; leaves non-ASCII as is
    return fast if fast.isascii() else json.dumps(positions, separators=(",", ":"))


class Published(NamedTuple):
    """One entry read back from the bus (for `straw stream`)."""

    entry_id: str  # the bus's own id of the entry (a Redis stream id, a JetStream sequence, an offset)
    seq: int
    event: bytes


class BusDown(Exception):
    """The bus cannot be reached or timed out: records wait in the outbox, and we retry with backoff."""


class BusRefused(Exception):
    """The bus refused our credentials or permissions: final, its message is the operator's one line."""


class Bus(Protocol):
    """A bus as the relay, `straw check/status/stream` and adoption use it. Methods raise only
    `BusDown` or `BusRefused` for the bus's own failures."""

    def checkpoint(self, stream: str) -> Checkpoint:
        """The stream's checkpoint as the bus holds it now."""
        ...

    def publish(self, stream: str, seen: Checkpoint, batch: Sequence[Outgoing], identity: str) -> Checkpoint | None:
        """Append `batch` (in `seq` order) and move the checkpoint to its last record, atomically, only if the
        stream's checkpoint is still `seen`. Returns the new checkpoint, or None if it had moved (nothing sent; on
        a bus without atomic batches, possibly a gap-free prefix of the batch): the caller re-reads the checkpoint."""
        ...

    def describe(self) -> tuple[bool, str]:
        """For `straw check`: whether the server can serve straw, and one line on what it is."""
        ...

    def length(self, stream: str) -> int:
        """How many entries the stream holds on the bus now."""
        ...

    def newest(self, stream: str, count: int) -> list[Published]:
        """The stream's newest `count` entries, oldest first."""
        ...

    def close(self) -> None: ...
