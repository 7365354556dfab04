"""The idempotence helper for hand-written loaders: the last applied `seq` per stream, kept in the target.

Call `fresh` and `mark` inside the transaction that applies the records: the change and the new `seq` commit
together, so a record delivered again (a crash before the ack, a replay) is filtered out by `fresh`.
`fresh` takes the stream's row for update, so two members of one group apply one after the other; for
records that may come out of order (several members, retries), use the SQL loader's per-key versions instead.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import MetaData, case, select, update
from sqlalchemy.engine import Connection

from loaders.records import Record
from loaders.sql_schema import bookkeeping

_APPLIED, _ = bookkeeping(MetaData(), None)


def create(conn: Connection) -> None:
    """Create `straw_applied` if it is missing."""
    _APPLIED.create(conn, checkfirst=True)


def last_applied(conn: Connection, stream: str) -> int:
    """The stream's last applied `seq`, its row locked until the transaction ends (0: none yet)."""
    found = conn.execute(select(_APPLIED.c.seq).where(_APPLIED.c.stream == stream).with_for_update()).first()
    if found is None:
        conn.execute(_APPLIED.insert().values(stream=stream, seq=0))
        return 0
    return int(found[0])


def fresh(conn: Connection, records: Sequence[Record]) -> list[Record]:
    """The records not applied yet, in stream order."""
    last = {stream: last_applied(conn, stream) for stream in sorted({r.stream for r in records})}
    return sorted((r for r in records if r.seq > last[r.stream]), key=lambda r: (r.stream, r.seq))


def mark(conn: Connection, records: Sequence[Record]) -> None:
    """Store each stream's highest `seq` of `records` (never lowering it)."""
    for stream in {r.stream for r in records}:
        top = max(r.seq for r in records if r.stream == stream)
        conn.execute(update(_APPLIED).where(_APPLIED.c.stream == stream)
                     .values(seq=case((_APPLIED.c.seq < top, top), else_=_APPLIED.c.seq)))
