"""A takeover's keyed state: staged from the stream, then applied in the takeover's transaction.

The instance that takes a stream over cannot read the other one's outbox, where the
per-key state of its keyed sources (snapshot listings, key sweeps) lived. The stream
holds the same knowledge: per key, its last event. `straw/handover.py` reads it a page
at a time; `stage` keeps each key's last event in a TEMP table (this connection's own
file: writing it takes no lock on the outbox, so the relay goes on meanwhile, and memory
stays bounded), and `apply` moves it into the keyed tables inside `Outbox.take_over`'s
transaction: a crash at any point leaves the outbox as it was.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

from outbox import keyed, sweep

STAGED = "temp.handover_last"


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
    keys: int = 0  # keys restored (alive at the end)


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


def apply(db: sqlite3.Connection, handover: Handover) -> None:
    """Inside the caller's transaction: reset the sources' state, then give each staged key its last event."""
    for source in handover.keyed:
        keyed.hand_over(db, source, exact=handover.exact)
        keyed.restore(db, source, STAGED)
    for source in handover.swept:
        sweep.hand_over(db, source, exact=handover.exact)
        sweep.restore(db, source, STAGED)
    db.execute(f"DELETE FROM {STAGED}")
    handover.keys = sum(keyed.known_keys(db, source) for source in handover.keyed) + sum(
        int(db.execute("SELECT count(*) FROM sweep_keys WHERE source = ?", (source,)).fetchone()[0])
        for source in handover.swept)
