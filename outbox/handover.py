"""A takeover's keyed state: applied to the outbox in the takeover's transaction (see `Outbox.take_over`).

The instance that takes a stream over cannot read the other one's outbox, where the
per-key state of its keyed sources (snapshot listings, key sweeps) lived. The stream
holds the same knowledge: per key, its last event. `straw/handover.py` reads it and
hands the pages over here; this module only writes them, so a crash mid-way leaves the
outbox as it was (the takeover is one transaction).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

from outbox import keyed, sweep


class Last(NamedTuple):
    """A key's last event in the stream (as far as read): its key data and data digest, or a delete."""

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
    events: int = 0  # counted as applied
    keys: int = 0  # keys restored (alive at the end)


def apply(db: sqlite3.Connection, handover: Handover) -> None:
    """Inside the caller's transaction: reset the sources' state, then replay the stream's last events on it."""
    for source in handover.keyed:
        keyed.hand_over(db, source, exact=handover.exact)
    for source in handover.swept:
        sweep.hand_over(db, source, exact=handover.exact)
    for page in handover.pages:
        listed: dict[str, dict[str, tuple[str, bytes] | None]] = {}
        delivered: dict[str, dict[str, str | None]] = {}
        for last in page:  # a later event of a key replaces an earlier one
            handover.events += 1
            if last.source in handover.keyed:
                listed.setdefault(last.source, {})[last.key] = (
                    None if last.key_data is None else (last.key_data, last.data_hash))
            if last.source in handover.swept:
                delivered.setdefault(last.source, {})[last.key] = last.key_data
        for source, keys in listed.items():
            keyed.restore(db, source, keys)
        for source, found in delivered.items():
            sweep.restore(db, source, found)
    handover.keys = sum(keyed.known_keys(db, source) for source in handover.keyed) + sum(
        int(db.execute("SELECT count(*) FROM sweep_keys WHERE source = ?", (source,)).fetchone()[0])
        for source in handover.swept)
