"""A takeover's keyed state: staged from the stream, then written in short steps before the takeover commits.

The instance that takes a stream over cannot read the other one's outbox, where the
per-key state of its keyed sources (snapshot listings, key sweeps) lived. The stream
holds the same knowledge: per key, its last event. `straw/handover.py` reads it a page
at a time; `stage` keeps each key's last event in a TEMP table (this connection's own
file: writing it takes no lock on the outbox, and memory stays bounded), and `steps`
writes it into the keyed tables a key range at a time, each step its own short
transaction (the relay publishes other streams in between). Until `Outbox.take_over`
commits, the takeover is owed (`Outbox.owe_take_over`): a crash or an error part-way
leaves a debt, and the next claim redoes it all (reset, then restore), so no half of
it is ever used: the stream's sources are not polled before the takeover commits.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from outbox import keyed, sweep

STAGED = "temp.handover_last"
STEP = 20_000  # keys per step: a short transaction (tens of ms), so the relay is not kept waiting


class Last(NamedTuple):
    """A key's event in the stream: its key data and data digest, or a delete."""

    source: str
    key: str
    key_data: str | None  # None: deleted
    data_hash: bytes  # of the canonical data (keyed sources); b"" for a delete


@dataclass
class Handover:
    keyed: frozenset[str]  # sources that list every key (DB snapshots, scraped listings)
    swept: frozenset[str]  # incremental sources with a key sweep (`deletes:`)
    exact: bool  # the stream holds every event of theirs (not trimmed)
    pages: Iterable[list[Last]]  # the stream's events in order, a page at a time
    events: int = 0  # events staged
    keys: int = 0  # keys known at the end


def stage(db: sqlite3.Connection, handover: Handover) -> None:
    """Each key's last event, in this connection's TEMP table, outside any transaction on the outbox."""
    db.execute(f"CREATE TABLE IF NOT EXISTS {STAGED} (source TEXT NOT NULL, key TEXT NOT NULL, key_data TEXT, "
               "data_hash BLOB NOT NULL, ord INTEGER NOT NULL, PRIMARY KEY (source, key)) WITHOUT ROWID")
    db.execute(f"DELETE FROM {STAGED}")
    for page in handover.pages:
        start = handover.events
        handover.events += len(page)
        # A later event of a key replaces an earlier one; `ord` stays the first: ids follow the stream's order.
        db.executemany(
            f"INSERT INTO {STAGED} (source, key, key_data, data_hash, ord) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (source, key) DO UPDATE SET key_data = excluded.key_data, data_hash = excluded.data_hash",
            [(*last, start + i) for i, last in enumerate(page)],
        )


def steps(db: sqlite3.Connection, handover: Handover) -> Iterator[None]:
    """Write the staged state, one bounded step per iteration: the caller runs each in its own transaction."""
    base = {source: keyed.next_id(db, source) for source in handover.keyed}
    base.update({source: sweep.next_id(db, source) for source in handover.swept})
    top = int(db.execute(f"SELECT coalesce(max(ord), -1) + 1 FROM {STAGED}").fetchone()[0])
    tables = [(keyed, "keyed_state", s) for s in sorted(handover.keyed)] + [
        (sweep, "sweep_keys", s) for s in sorted(handover.swept)]
    for module, table, source in tables:
        module.hand_over(db, source)
        yield
        for within, args in _ranges(db, table, source):
            module.reset(db, source, within, args, exact=handover.exact)
            yield
        for within, args in _ranges(db, STAGED, source):
            module.restore(db, source, STAGED, within, args, base[source])
            yield
        module.move_ids(db, source, base[source] + top)
        handover.keys += int(db.execute(f"SELECT count(*) FROM {table} WHERE source = ?", (source,)).fetchone()[0])
    db.execute(f"DELETE FROM {STAGED}")


def _ranges(db: sqlite3.Connection, table: str, source: str) -> Iterator[tuple[str, tuple[str, ...]]]:
    """The keys of `source` in `table`, STEP at a time, as (SQL condition on `key`, its arguments).

    Each range's end is found when it is due (a step may delete keys, but only within its own range).
    """
    after: str | None = None
    while True:
        if after is None:
            row = db.execute(f"SELECT key FROM {table} WHERE source = ? ORDER BY key LIMIT 1 OFFSET ?",
                             (source, STEP - 1)).fetchone()
        else:
            row = db.execute(f"SELECT key FROM {table} WHERE source = ? AND key > ? ORDER BY key LIMIT 1 OFFSET ?",
                             (source, after, STEP - 1)).fetchone()
        lower, lower_args = ("", ()) if after is None else (" AND key > ?", (after,))
        if row is None:
            yield lower, lower_args
            return
        yield f"{lower} AND key <= ?", (*lower_args, str(row[0]))
        after = str(row[0])
