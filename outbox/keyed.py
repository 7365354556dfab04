"""Keyed change detection: what a keyed source delivered before, per key, kept in the outbox.

A keyed source (a DB `snapshot`, a scraped listing) reports everything it sees each
time; this module turns that into changes. Each key has two digests and a number
(`id`, never reused within its source); each listing (a *generation*) records which
ids it saw:

- `hash`, of the row as read (raw values and op, keyed by the mapping's shape): the
  mapper asks for it first (`digests`), and a row whose digest is unchanged is not
  even mapped (its key is passed as `unchanged`: only its mark moves). In a listing
  that is nearly every row, and mapping is the costly part;
- `data_hash`, of the canonical data: a new or changed row is an `upserted` event only
  when this differs (a row read differently but mapping to the same record is not);
- a row with op `deleted` is an event only if the key is known (then it is forgotten);
- a row that cannot be mapped (a dead letter) keeps its key alive (op SEEN), so it is
  not reported deleted, and its raw digest, so it is one dead letter per version;
- each batch commits the ids it saw as one packed row of `keyed_seen` (a key listed
  again as delivered costs no write of its own);
- when a listing completes, every key whose id no batch of the listing saw becomes a
  `deleted` event and is forgotten, and the generation moves on.

The seam, for any keyed source: yield `RawBatch(..., keyed=True)` batches and end a
complete listing with `complete=True` and an `end` position unique to that listing
(it may have no rows); the runner (`straw.runner.poll`) calls
`Mapper.map_keyed(batch, outbox.digests)` and `Outbox.append_keyed(...)` with the
mapped batch's `changes`, `dead` and `unchanged` (leave out `unchanged` and those keys
look vanished at the end of the listing). Deleted events carry the key fields as data.

Why mark-and-sweep in SQLite rather than a dict or a streaming merge:
- memory: a batch looks up only its own keys; the sweep holds one byte per id (1 MB
  for a 1,000,000-row table) and streams the keys from a cursor.
- order: a merge needs the source's order and ours to agree, but databases sort text
  by their collation and web pages are not sorted at all; marking needs no order.
- atomicity: marks, records and position commit in the caller's one transaction, so a
  listing cut short by a crash resumes after its last committed batch, or starts over
  (rows already marked with an equal hash are skipped): nothing lost, nothing repeated.
The cost is one indexed lookup per listed row, one small row per batch, and one scan
of the source's keys per listing. (Marking each key in its own row, as this did
before, wrote a page per key: keys sort as text, "10" before "9", so a batch's keys
are scattered over the table, and the commits were a third of a listing's time.)

The state lives in one outbox. An instance that takes a stream over from another
(`straw/lease.py`) rebuilds it from the stream (`straw/handover.py`, `outbox/handover.py`):
`hand_over`, `reset`, then `restore` with each key's last event. A restored key has no row digest (b""), so the
first listing maps every row once, and its data digest decides: an unchanged row is
not sent again, and a key the stream holds but the listing lacks is a `deleted` event.
"""

from __future__ import annotations

import sqlite3
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import repeat
from typing import Any, NamedTuple

import orjson

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS keyed_state (
    source TEXT NOT NULL,
    key TEXT NOT NULL,
    key_data TEXT NOT NULL,
    hash BLOB NOT NULL,
    data_hash BLOB NOT NULL,
    id INTEGER NOT NULL,
    PRIMARY KEY (source, key)
) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS keyed_sources (
    source TEXT PRIMARY KEY,
    gen INTEGER NOT NULL,
    next_id INTEGER NOT NULL DEFAULT 1
)""",
    "CREATE TABLE IF NOT EXISTS keyed_seen (source TEXT NOT NULL, gen INTEGER NOT NULL, ids BLOB NOT NULL)",
    # Keys in id order, which is the order they were first listed in: see `digests`.
    "CREATE INDEX IF NOT EXISTS keyed_state_ids ON keyed_state (source, id, key, hash)",
)
IDS = "q"  # array type code of packed ids

UPSERTED = "upserted"
DELETED = "deleted"
SEEN = "seen"  # the row is there but could not be mapped (a dead letter): keep its key, send nothing
CHUNK = 900  # host parameters per IN (...): below SQLite's oldest limit of 999


# The statements whose plans matter at a million keys (tests/test_keyed_outbox.py asserts them with EXPLAIN):
SWEEP_SCAN = "SELECT id, key FROM keyed_state WHERE source = ? ORDER BY id"  # the covering keyed_state_ids
DIGEST_RUN = (  # one range of ids, on keyed_state_ids
    "SELECT key, id, hash FROM keyed_state INDEXED BY keyed_state_ids WHERE source = ? AND id BETWEEN ? AND ?"
)
DIGEST_IDS = (  # the same range, for `by_digest`
    "SELECT hash, id FROM keyed_state INDEXED BY keyed_state_ids WHERE source = ? AND id BETWEEN ? AND ?"
)
STALE_LOOKUP = (  # keys by id, in id order, on keyed_state_ids
    "SELECT key FROM keyed_state INDEXED BY keyed_state_ids WHERE source = ? AND id IN ({marks}) ORDER BY id"
)
KNOWN_LOOKUP = "SELECT key, id, hash, data_hash FROM keyed_state WHERE source = ? AND key IN ({marks})"  # primary key


def known(db: sqlite3.Connection, source: str) -> bool:
    """Whether `source` is keyed: it has delivered a keyed batch."""
    return db.execute("SELECT 1 FROM keyed_sources WHERE source = ?", (source,)).fetchone() is not None


def relist(db: sqlite3.Connection, source: str, key: str) -> None:
    """The next listing maps `key`'s row again, whatever it reads (a retried dead letter): its row digest is
    forgotten, its data digest (what was delivered) kept."""
    db.execute("UPDATE keyed_state SET hash = X'' WHERE source = ? AND key = ?", (source, key))


def forget(db: sqlite3.Connection, source: str) -> None:
    """Forget all `source` delivered: its next complete listing sends every row again (a replay)."""
    for table in ("keyed_state", "keyed_seen", "keyed_sources"):
        db.execute(f"DELETE FROM {table} WHERE source = ?", (source,))


def hand_over(db: sqlite3.Connection, source: str) -> None:
    """A takeover (outbox/handover.py): any listing under way starts over, and the source counts as keyed."""
    db.execute("DELETE FROM keyed_seen WHERE source = ?", (source,))
    _generation(db, source)


def reset(db: sqlite3.Connection, source: str, within: str, args: Sequence[str], *, exact: bool) -> None:
    """A takeover, on the keys `within` (an SQL condition on `key`): what this outbox delivered is replaced.

    `exact` (the stream holds every event of the source): forget it (it may hold fenced
    changes the bus never saw). Otherwise (a trimmed stream) keep the keys, data unknown:
    a key listed again is sent again, a key not listed is a `deleted` event (at least once
    rather than never). `restore` then gives the stream's keys their last event.
    """
    if exact:
        db.execute(f"DELETE FROM keyed_state WHERE source = ? {within}", (source, *args))
    else:
        db.execute(f"UPDATE keyed_state SET hash = x'', data_hash = x'' WHERE source = ? {within}", (source, *args))


def restore(db: sqlite3.Connection, source: str, staged: str, within: str, args: Sequence[str], base: int) -> None:
    """The last events of the keys of `source` `within` a range, from the table `staged` (outbox/handover.py):
    a deleted key is forgotten, the others get their key data and data digest (id: `base` + their `ord`).

    No row digest is known (b""): the next listing maps the row and compares its data digest.
    """
    db.execute(f"DELETE FROM keyed_state WHERE source = ? AND key IN "
               f"(SELECT key FROM {staged} WHERE source = ? {within} AND key_data IS NULL)", (source, source, *args))
    db.execute(
        f"INSERT INTO keyed_state (source, key, key_data, hash, data_hash, id) "
        f"SELECT source, key, key_data, x'', data_hash, ? + ord FROM {staged} "
        f"WHERE source = ? {within} AND key_data IS NOT NULL "
        "ON CONFLICT (source, key) DO UPDATE SET key_data = excluded.key_data, hash = x'', "
        "data_hash = excluded.data_hash",
        (base, source, *args),
    )


def next_id(db: sqlite3.Connection, source: str) -> int:
    return _generation(db, source)[1]


def move_ids(db: sqlite3.Connection, source: str, to: int) -> None:
    """Ids below `to` are taken (a takeover restored keys up to there)."""
    db.execute("UPDATE keyed_sources SET next_id = max(next_id, ?) WHERE source = ?", (to, source))


def sweep_lookup(count: int) -> str:
    """The key data of `count` stale keys, by the primary key (source, key)."""
    return f"SELECT key, key_data FROM keyed_state WHERE source = ? AND key IN ({','.join('?' * count)})"


def create(db: sqlite3.Connection) -> None:
    """The keyed-state tables; an outbox from before ids has its keys carried over."""
    db.execute("BEGIN IMMEDIATE")  # the poller and the relay both open the outbox: one of them does this
    try:
        columns = {row[1] for row in db.execute("PRAGMA table_info(keyed_state)")}
        old = bool(columns) and "id" not in columns
        if old:
            db.execute("ALTER TABLE keyed_state RENAME TO keyed_state_old")
            db.execute("ALTER TABLE keyed_sources ADD COLUMN next_id INTEGER NOT NULL DEFAULT 1")
        for statement in SCHEMA:
            db.execute(statement)
        if old:
            db.execute(
                "INSERT INTO keyed_state (source, key, key_data, hash, data_hash, id) "
                "SELECT source, key, key_data, hash, data_hash, row_number() OVER (PARTITION BY source ORDER BY key) "
                "FROM keyed_state_old"
            )
            db.execute("DROP TABLE keyed_state_old")
            # The listing under way (if any) starts over: its marks were in the old table.
            db.execute(
                "UPDATE keyed_sources SET next_id = 1 + coalesce((SELECT max(id) FROM keyed_state s "
                "WHERE s.source = keyed_sources.source), 0)"
            )
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


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
    db: sqlite3.Connection, source: str, changes: Sequence[Change], encode: Encode, unchanged: Sequence[int] = ()
) -> list[tuple[str, bytes]]:
    """Record this batch's keys as seen in the current generation; return the events to record.

    `unchanged`: ids of keys whose stored digest the mapper found equal (`digests`).
    Runs inside the caller's transaction.
    """
    gen, next_id = _generation(db, source)
    stored = _known(db, source, [c.key for c in changes])
    events: list[tuple[str, bytes]] = []
    marks: dict[str, tuple[str, str, str, bytes, bytes, int]] = {}
    forget: list[tuple[str, str]] = []
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
            data_digest = known[2] if known is not None else b""
        elif known is None or known[2] != data_digest:
            events.append((change.position, encode(UPSERTED, change.key, change.position, change.data)))
        if known is None:
            known = (next_id, change.digest, data_digest)
            next_id += 1
        marks[change.key] = (source, change.key, change.key_data, change.digest, data_digest, known[0])
        stored[change.key] = (known[0], change.digest, data_digest)
    db.executemany("DELETE FROM keyed_state WHERE source = ? AND key = ?", forget)
    db.executemany(
        "INSERT INTO keyed_state (source, key, key_data, hash, data_hash, id) VALUES (?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (source, key) DO UPDATE SET key_data = excluded.key_data, hash = excluded.hash, "
        "data_hash = excluded.data_hash",
        marks.values(),
    )
    seen = array(IDS, unchanged)
    seen.extend(mark[-1] for mark in marks.values())
    if seen:
        db.execute("INSERT INTO keyed_seen (source, gen, ids) VALUES (?, ?, ?)", (source, gen, seen.tobytes()))
    db.execute("UPDATE keyed_sources SET next_id = ? WHERE source = ?", (next_id, source))
    return events


def sweep(db: sqlite3.Connection, source: str, position: str, encode: Encode) -> Iterator[tuple[str, bytes]]:
    """The listing is complete: yield a `deleted` event per key not seen in it, then forget them.

    A generator over a cursor, so a mass deletion streams; the caller must exhaust it
    inside its transaction (the generation moves on when it is exhausted).
    """
    gen, next_id = _generation(db, source)
    seen = seen_marks(db.execute("SELECT ids FROM keyed_seen WHERE source = ? AND gen = ?", (source, gen)), next_id)
    gone: list[str] = []  # forgotten once the scan is over: no writes to a table under an open cursor
    for stale in _stale(db, source, seen):
        for start in range(0, len(stale), CHUNK):
            part = stale[start : start + CHUNK]
            # No ORDER BY here: with one, SQLite walks the id index instead of the key index (10x slower on
            # 1M keys); `part` is already in listing order, so a dict puts the rows back in it.
            found = dict(db.execute(sweep_lookup(len(part)), (source, *part)).fetchall())
            for key in part:
                key_data = found.get(key)
                if key_data is not None:
                    yield position, encode(DELETED, key, position, orjson.loads(key_data))
        gone.extend(stale)
    for start in range(0, len(gone), CHUNK):
        part = gone[start : start + CHUNK]
        marks = ",".join("?" * len(part))
        db.execute(f"DELETE FROM keyed_state WHERE source = ? AND key IN ({marks})", (source, *part))
    db.execute("DELETE FROM keyed_seen WHERE source = ?", (source,))
    db.execute("UPDATE keyed_sources SET gen = gen + 1 WHERE source = ?", (source,))


def _stale(db: sqlite3.Connection, source: str, seen: bytearray) -> Iterator[list[str]]:
    """The keys of `source` whose id `seen` lacks, in listing (id) order, a batch at a time.

    Few ids unseen (a listing that found most keys again): each one looked up on the id index, found
    from `seen` in C; scanning every key of the source for them was most of a sweep's time. Many (a
    mass deletion, or ids freed by earlier ones piling up as unseen): one scan of the index.
    """
    if seen.count(0) * 4 > len(seen):
        keys = db.execute(SWEEP_SCAN, (source,))
        while rows := keys.fetchmany(10_000):
            yield [key for id_, key in rows if not seen[id_]]
        return
    ids: list[int] = []
    at = seen.find(0)
    while at >= 0:
        ids.append(at)
        at = seen.find(0, at + 1)
    for start in range(0, len(ids), CHUNK):
        part = ids[start : start + CHUNK]
        yield [key for (key,) in db.execute(STALE_LOOKUP.format(marks=",".join("?" * len(part))), (source, *part))]


def seen_marks(packed_rows: Iterable[tuple[bytes]], size: int) -> bytearray:
    """One byte per key id below `size`: 1 where one of the listing's packed `ids` rows holds it."""
    seen = bytearray(size)
    ids = array(IDS)
    for (packed,) in packed_rows:
        ids.frombytes(packed)
        deque(map(seen.__setitem__, ids, repeat(1)), maxlen=0)  # in C: a listing has a million of them
        del ids[:]
    return seen


def _generation(db: sqlite3.Connection, source: str) -> tuple[int, int]:
    """The source's listing number and next key id."""
    row = db.execute("SELECT gen, next_id FROM keyed_sources WHERE source = ?", (source,)).fetchone()
    if row is not None:
        return int(row[0]), int(row[1])
    db.execute("INSERT INTO keyed_sources (source, gen, next_id) VALUES (?, 1, 1)", (source,))
    return 1, 1


def known_keys(db: sqlite3.Connection, source: str) -> int:
    return int(db.execute("SELECT count(*) FROM keyed_state WHERE source = ?", (source,)).fetchone()[0])


def digests(db: sqlite3.Connection, source: str, keys: Sequence[str]) -> dict[str, tuple[int, bytes]]:
    """The stored id and row digest of each of `keys` that is known (a batch's worth: bounded).

    A listing comes in the same order each time, and ids were given in that order, so
    a batch's keys are mostly one run of ids: read that run in one range scan of an
    index, a third of the cost of looking keys up one by one (keys sort as text, "10"
    before "9": one by one they are scattered). Keys outside the run (new since, or
    moved) are looked up one by one.
    """
    unique = list(dict.fromkeys(keys))
    found: dict[str, tuple[int, bytes]] = {}
    ends = _known(db, source, [unique[0], unique[-1]]) if len(unique) >= _RUN else {}
    first, last = (ends.get(unique[0]), ends.get(unique[-1])) if ends else (None, None)
    if first is not None and last is not None and 0 <= last[0] - first[0] < 2 * len(unique):
        wanted = set(unique)
        found = {
            key: (id_, digest)
            for key, id_, digest in db.execute(
                DIGEST_RUN,
                (source, first[0], last[0]),
            )
            if key in wanted
        }
    rest = [key for key in unique if key not in found]
    found.update((key, (row[0], row[1])) for key, row in _known(db, source, rest).items() if row is not None)
    return found


_RUN = 64  # from this many keys a batch's run of ids is worth a range scan


def by_digest(
    db: sqlite3.Connection, source: str, ends: Sequence[str], listed: Sequence[bytes | None]
) -> list[int | None]:
    """For each digest of a page `listed` by the database, the id of the stored key with that very digest,
    or None; `ends`: the keys of a few rows at each end of the page.

    A database digest covers the row's key columns along with the other mapped ones (and the
    mapping's shape, see `adapters/db/digest.py`), so a stored key with an equal digest is the listed
    row's key, delivered unchanged: nothing about the row is needed to mark it, not even its key as
    text (building it was a third of a listing's work). As in `digests`, the page's keys are one run
    of ids: its known `ends` bound the run, one range scan of the covering id index gives the run's
    digests, and the compare is a dict lookup per row in C. A row not found here (new, changed,
    outside the run, or a digest the database could not compute) is for the key-by-key path.
    """
    ids = [row[0] for row in _known(db, source, ends).values() if row is not None]
    if not ids or max(ids) - min(ids) >= 2 * len(listed):
        return [None] * len(listed)
    # Only a database digest can equal a listed one (17 bytes, `straw.source.DB_DIGEST` first); a restored
    # key's empty digest or a Python one never does, and no two keys share one (each covers its key).
    found: dict[bytes | None, int] = dict(db.execute(DIGEST_IDS, (source, min(ids), max(ids))))
    return list(map(found.get, listed))


def _known(db: sqlite3.Connection, source: str, keys: Sequence[str]) -> dict[str, tuple[int, bytes, bytes] | None]:
    found: dict[str, tuple[int, bytes, bytes] | None] = {}
    unique = list(dict.fromkeys(keys))
    for start in range(0, len(unique), CHUNK):
        chunk = unique[start : start + CHUNK]
        marks = ",".join("?" * len(chunk))
        for key, id_, digest, data_digest in db.execute(
            KNOWN_LOOKUP.format(marks=marks),
            (source, *chunk),
        ):
            found[key] = (id_, digest, data_digest)
    return found
