"""The seam between a source adapter and the rest of straw.

Two kinds of source feed the same pipeline:

- *Incremental* sources (DB `incrementing`/`timestamp`) read only what changed after
  a stored position; every row they yield is an event.
- *Keyed* sources (DB `snapshot`, web pages) list everything they can see, every
  time. Mark their batches `keyed=True`: the runner then compares each row's
  entity key and content hash with what this source delivered before (state kept
  in the outbox, committed with each batch, see `outbox/keyed.py`) and emits
  `upserted` only for new or changed keys. The batch that ends a complete listing
  says `complete=True`: every key not seen since the previous complete batch
  becomes a `deleted` event. An interrupted listing may resume after its last
  committed position or start over; either way nothing is lost or repeated.

Any row may also carry op `deleted` (`ops`), e.g. a soft-delete flag: its event is
`<entity>.deleted` with the key fields as data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

# The first byte of a digest computed by the database (17 bytes); a Python digest is 16 bytes of blake2b with no
# marker, so the two kinds never compare equal.
DB_DIGEST = b"d"


def database_digest(digest: bytes) -> bool:
    """Whether a stored digest is the database's (a Python digest may start with the same byte: 16 bytes)."""
    return len(digest) == 17 and digest[:1] == DB_DIGEST


@dataclass(frozen=True, slots=True)
class RawBatch:
    """Rows read after a stored position, each with the position it moves the source to.

    `positions[i]` is row i's position as compact JSON text: stored in the outbox,
    sent on the stream, and part of the event id.

    `ops[i]` (optional) is row i's op, `records.UPSERTED` or `records.DELETED`; None: all upserted.
    `keyed`: compare rows with this source's previous deliveries by key and content hash.
    `complete` (keyed only): this batch ends a complete listing; keys not seen since the
    last complete batch are deleted. It may have no rows.
    `end`: the position stored after this batch when it is not `positions[-1]`; needed
    when the batch has no rows. For a complete batch it also identifies the listing, so
    it must differ from one listing to the next (it is part of the deleted events' ids).
    `late`: rows found behind the watermark (committed after the settle window gave their ids up): their
    records carry `end`, the watermark, since the bus checkpoint takes a source's position from its last
    record; their event ids keep their own positions.
    `on_commit`: called once the batch is in the outbox (a late batch's rows are then no longer looked for).
    `memo`: the source's own state to commit with this batch's position (None: unchanged), handed back
    through `Source.restore` when straw starts again (the id gaps a settle window still watches).
    """

    columns: tuple[str, ...]
    rows: Sequence[Sequence[Any]]
    positions: Sequence[str]
    ops: Sequence[str] | None = None
    keyed: bool = False
    complete: bool = False
    end: str | None = None
    late: bool = False
    on_commit: Callable[[], None] | None = None
    memo: str | None = None
    # A digest listing (keyed only): `digests[i]` is row i's digest as the database computed it (None: it could
    # not), and `fetch` reads the full rows of the keys at the given indexes, with their digests; `rows` then
    # hold the key columns only. Without `fetch`, `digests` (if any) are those of full rows.
    digests: Sequence[bytes | None] | None = None
    fetch: Callable[[Sequence[int]], RawBatch] | None = None

    def __post_init__(self) -> None:
        if len(self.rows) != len(self.positions):
            raise ValueError("a RawBatch needs exactly one position per row")
        if self.ops is not None and len(self.ops) != len(self.rows):
            raise ValueError("a RawBatch needs exactly one op per row, or none")
        if not self.rows and self.end is None:
            raise ValueError("a RawBatch without rows needs an `end` position")
        if self.digests is not None and len(self.digests) != len(self.rows):
            raise ValueError("a RawBatch needs exactly one digest per row, or none")
        if self.complete and not self.keyed:
            raise ValueError("only a keyed batch can end a complete listing")

    @property
    def next_position(self) -> str:
        """Where the source stands after this batch."""
        return self.end if self.end is not None else self.positions[-1]


class Source(Protocol):
    """Reads a legacy system, never writes to it."""

    name: str

    def read(self, after: str | None, limit: int | None = None) -> Iterator[RawBatch]:
        """Rows after position `after` (None: from the start), in position order."""
        ...

    def restore(self, memo: str | None) -> None:
        """The `memo` last committed with this source's position (see RawBatch; None: none), before its first
        read, and again after a lease takeover has replaced the position."""
        ...

    def check(self) -> str:
        """Connect and verify what the configuration expects; return a one-line summary."""
        ...

    def close(self) -> None: ...
