"""Keyed change detection: what a keyed source delivered before, per key, kept in the outbox.

A keyed source (a DB `snapshot`, a scraped listing) reports everything it sees each
time; this module turns that into changes. Each key has two digests and the
*generation* (listing number) in which it was last seen:

- `hash`, of the row as read (raw values and op, keyed by the mapping's shape): the
  mapper asks for it first (`digests`), and a row whose digest is unchanged is not
  even mapped (its key is passed as `unchanged`: only its mark moves). In a listing
  that is nearly every row, and mapping is the costly part;
- `data_hash`, of the canonical data: a new or changed row is an `upserted` event only
  when this differs (a row read differently but mapping to the same record is not);
- a row with op `deleted` is an event only if the key is known (then it is forgotten);
- a row that cannot be mapped (a dead letter) keeps its key alive (op SEEN), so it is
  not reported deleted, and its raw digest, so it is one dead letter per version;
- when a listing completes, every key not seen in it (generation below the current
  one) becomes a `deleted` event and is forgotten, and the generation moves on.

The seam, for any keyed source: yield `RawBatch(..., keyed=True)` batches and end a
complete listing with `complete=True` and an `end` position unique to that listing
(it may have no rows); the runner (`straw.runner.poll`) calls
`Mapper.map_keyed(batch, outbox.digests)` and `Outbox.append_keyed(...)` with the
mapped batch's `changes`, `dead` and `unchanged` (leave out `unchanged` and those keys
look vanished at the end of the listing). Deleted events carry the key fields as data.

Why mark-and-sweep in SQLite rather than a dict or a streaming merge:
- memory: a batch looks up only its own keys, so a 1,000,000-row table needs no more
  RAM than a 1,000-row one; the sweep streams stale keys from a cursor.
- order: a merge needs the source's order and ours to agree, but databases sort text
  by their collation and web pages are not sorted at all; marking needs no order.
- atomicity: marks, records and position commit in the caller's one transaction, so a
  listing cut short by a crash resumes after its last committed batch, or starts over
  (rows already marked with an equal hash are skipped): nothing lost, nothing repeated.
The cost is one indexed lookup and one row write per listed row, and one scan of the
source's keys per listing.

Caveat: the state lives in one outbox; a replacement outbox (failover to another host)
starts empty, so its first complete listing re-sends every row as `upserted` and cannot
report keys deleted while no outbox knew them.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import orjson

SCHEMA = """
CREATE TABLE IF NOT EXISTS keyed_state (
    source TEXT NOT NULL,
    key TEXT NOT NULL,
    key_data TEXT NOT NULL,
    hash BLOB NOT NULL,
    data_hash BLOB NOT NULL,
    gen INTEGER NOT NULL,
    PRIMARY KEY (source, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS keyed_sources (source TEXT PRIMARY KEY, gen INTEGER NOT NULL);
"""

UPSERTED = "upserted"
DELETED = "deleted"
SEEN = "seen"  # the row is there but could not be mapped (a dead letter): keep its key, send nothing
_CHUNK = 900  # host parameters per IN (...): below SQLite's oldest limit of 999


class Change(NamedTuple):
    """One row of a keyed batch, mapped: `data` is what an upserted event carries."""

    key: str  # the entity key as text (the event's subject)
    key_data: str  # the key fields as a JSON object: the data of a later `deleted` event
    digest: bytes  # hash of the row as read: an equal one skips mapping (the key is only `unchanged`)
    data_digest: bytes  # hash of the canonical `data`: only a different one is an event
    op: str  # UPSERTED, DELETED or SEEN
    position: str
    data: dict[str, Any]


# (op, key, position, data) -> the encoded event
Encode = Callable[[str, str, str, dict[str, Any]], bytes]


def apply(
    db: sqlite3.Connection, source: str, changes: Sequence[Change], encode: Encode, unchanged: Sequence[str] = ()
) -> list[tuple[str, bytes]]:
    """Mark this batch's keys in the current generation; return the events to record.

    `unchanged`: keys whose stored digest the mapper found equal (only their mark moves).
    Runs inside the caller's transaction.
    """
    gen = generation(db, source)
    stored = _known(db, source, [c.key for c in changes])
    events: list[tuple[str, bytes]] = []
    marks: dict[str, tuple[str, str, str, bytes, bytes, int]] = {}
    forget: list[tuple[str, str]] = []
    touch = unchanged
    for change in changes:
        known = stored.get(change.key)
        if change.op == DELETED:
            if known is not None:
                events.append((change.position, encode(DELETED, change.key, change.position, change.data)))
                forget.append((source, change.key))
                marks.pop(change.key, None)
                stored[change.key] = None
            continue
        data_digest = change.data_digest
        if change.op == SEEN:
            # Keep the digest of the unreadable version (one dead letter per version, not per listing) and
            # the data digest of the last good one.
            data_digest = known[1] if known is not None else b""
        elif known is None or known[1] != data_digest:
            events.append((change.position, encode(UPSERTED, change.key, change.position, change.data)))
        marks[change.key] = (source, change.key, change.key_data, change.digest, data_digest, gen)
        stored[change.key] = (change.digest, data_digest)
    db.executemany("DELETE FROM keyed_state WHERE source = ? AND key = ?", forget)
    for start in range(0, len(touch), _CHUNK):  # one statement per chunk: a third cheaper than one per key
        chunk = touch[start : start + _CHUNK]
        db.execute(
            f"UPDATE keyed_state SET gen = ? WHERE source = ? AND key IN ({','.join('?' * len(chunk))})",
            (gen, source, *chunk),
        )
    db.executemany(
        "INSERT INTO keyed_state (source, key, key_data, hash, data_hash, gen) VALUES (?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (source, key) DO UPDATE SET key_data = excluded.key_data, hash = excluded.hash, "
        "data_hash = excluded.data_hash, gen = excluded.gen",
        marks.values(),
    )
    return events


def sweep(db: sqlite3.Connection, source: str, position: str, encode: Encode) -> Iterator[tuple[str, bytes]]:
    """The listing is complete: yield a `deleted` event per key not seen in it, then forget them.

    A generator over a cursor, so a mass deletion streams; the caller must exhaust it
    inside its transaction (the generation moves on when it is exhausted).
    """
    gen = generation(db, source)
    stale = db.execute(
        "SELECT key, key_data FROM keyed_state WHERE source = ? AND gen < ? ORDER BY key", (source, gen)
    )
    for key, key_data in stale:
        yield position, encode(DELETED, key, position, orjson.loads(key_data))
    db.execute("DELETE FROM keyed_state WHERE source = ? AND gen < ?", (source, gen))
    db.execute("UPDATE keyed_sources SET gen = gen + 1 WHERE source = ?", (source,))


def generation(db: sqlite3.Connection, source: str) -> int:
    row = db.execute("SELECT gen FROM keyed_sources WHERE source = ?", (source,)).fetchone()
    if row is not None:
        return int(row[0])
    db.execute("INSERT INTO keyed_sources (source, gen) VALUES (?, 1)", (source,))
    return 1


def known_keys(db: sqlite3.Connection, source: str) -> int:
    return int(db.execute("SELECT count(*) FROM keyed_state WHERE source = ?", (source,)).fetchone()[0])


def digests(db: sqlite3.Connection, source: str, keys: Sequence[str]) -> dict[str, bytes]:
    """The stored row digest of each of `keys` that is known (a batch's worth: bounded)."""
    return {key: pair[0] for key, pair in _known(db, source, keys).items() if pair is not None}


def _known(db: sqlite3.Connection, source: str, keys: Sequence[str]) -> dict[str, tuple[bytes, bytes] | None]:
    found: dict[str, tuple[bytes, bytes] | None] = {}
    unique = list(dict.fromkeys(keys))
    for start in range(0, len(unique), _CHUNK):
        chunk = unique[start : start + _CHUNK]
        marks = ",".join("?" * len(chunk))
        for key, digest, data_digest in db.execute(
            f"SELECT key, hash, data_hash FROM keyed_state WHERE source = ? AND key IN ({marks})", (source, *chunk)
        ):
            found[key] = (digest, data_digest)
    return found
