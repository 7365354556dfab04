"""The seam between a source adapter and the rest of straw."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class RawBatch:
    """Rows read after a stored position, each with the position it moves the source to.

    `positions[i]` is row i's position as compact JSON text: stored in the outbox,
    sent on the stream, and part of the event id.
    """

    columns: tuple[str, ...]
    rows: Sequence[Sequence[Any]]
    positions: Sequence[str]

    def __post_init__(self) -> None:
        if len(self.rows) != len(self.positions):
            raise ValueError("a RawBatch needs exactly one position per row")


class Source(Protocol):
    """Reads a legacy system, never writes to it."""

    name: str

    def read(self, after: str | None, limit: int | None = None) -> Iterator[RawBatch]:
        """Rows after position `after` (None: from the start), in position order."""
        ...

    def check(self) -> str:
        """Connect and verify what the configuration expects; return a one-line summary."""
        ...

    def close(self) -> None: ...
