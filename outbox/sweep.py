"""Key sweep state: which keys an incremental source delivered, to find the ones hard-deleted since.

`timestamp` and `incrementing` sources read only rows changed after their watermark, so
a row deleted from the legacy table is never seen again. With `deletes: {sweep_interval}`
the source's keys are listed now and then (keys only, in key order) and compared with
the keys straw delivered; each delivered key the listing no longer has becomes a
`deleted` event and is forgotten.

- Delivered keys (`sweep_keys`) are recorded by `record` in the transaction that
  appends their events: an `upserted` event records (or refreshes) its key, a `deleted`
  one forgets it. A key inserted in the legacy table but not delivered yet is not here,
  so it can never be swept (whatever the watermark holds back, e.g. a settle delay).
- Each key carries the *epoch* of its last delivery. Starting a sweep (`begin`) moves the
  epoch on and keeps the old one as the sweep's cutoff: only keys delivered before the
  sweep started are compared, i.e. keys the listing (which starts after that commit)
  must see if they still exist. A key delivered while a sweep is under way (after a
  crash cut it short) waits for the next sweep.
- The listing is marked as keyed.py marks a snapshot listing: each batch commits the
  ids of the delivered keys it saw as one packed row of `sweep_seen`, with the listing's
  resume position (`after`), so a sweep cut short resumes after its last committed batch.
  `finish` then holds one byte per key id ever given, streams the keys, and yields a `deleted` event
  for each compared key not seen; the caller commits those events, the forgetting and
  the end of the sweep in one transaction. A kill at any moment loses and repeats nothing.
- A sweep's deleted events are identified by the sweep's number (`position`): the same
  sweep re-run after a crash gives the same event ids, a later sweep new ones. Numbers
  are start times in milliseconds (never below the previous one + 1), so a new outbox
  does not reuse them.

This module knows nothing of the legacy database: the runner lists keys through the DB
adapter and passes them here as event subjects.
"""

from __future__ import annotations

import json
import sqlite3
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import orjson

from outbox.keyed import CHUNK, IDS, seen_marks

SCHEMA = (
    # One b-tree per key, found by its text (`record`, `mark`); `id` numbers it for the marks.
    """CREATE TABLE IF NOT EXISTS sweep_keys (
    source TEXT NOT NULL,
    key TEXT NOT NULL,
    key_data TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    id INTEGER NOT NULL,
    PRIMARY KEY (source, key)
) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS sweep_sources (
    source TEXT PRIMARY KEY,
    epoch INTEGER NOT NULL DEFAULT 1,
    next_id INTEGER NOT NULL DEFAULT 1,
    number INTEGER NOT NULL DEFAULT 0,
    running INTEGER NOT NULL DEFAULT 0,
    cutoff INTEGER NOT NULL DEFAULT 0,
    after TEXT,
    started REAL
)""",
    "CREATE TABLE IF NOT EXISTS sweep_seen (source TEXT NOT NULL, number INTEGER NOT NULL, ids BLOB NOT NULL)",
)
DELETED = "deleted"

# (op, key, position, data) -> the encoded event, as in keyed.py
Encode = Callable[[str, str, str, dict[str, Any]], bytes]


class Sweep(NamedTuple):
    """A sweep under way: its number and where its listing resumes (None: from the first key)."""

    number: int
    after: str | None

    @property
    def position(self) -> str:
        """What the sweep's deleted events are identified by (their ids' position)."""
        return orjson.dumps(["sweep", self.number]).decode()


def create(db: sqlite3.Connection) -> None:
    for statement in SCHEMA:
        db.execute(statement)


def record(db: sqlite3.Connection, source: str, key_fields: Sequence[str], events: Iterable[bytes]) -> None:
    """Note the keys of these events as delivered now (inside the caller's transaction)."""
    epoch, next_id = _state(db, source)[:2]
    last: dict[str, str | None] = {}  # key -> key data, None: deleted (the last event of a key wins)
    for event in events:
        parsed = loads_event(event)
        key = parsed["subject"]
        if str(parsed["type"]).endswith("." + DELETED):
            last[key] = None
        else:
            data = parsed["data"]
            last[key] = orjson.dumps({k: data[k] for k in key_fields}).decode()
    kept = [key for key, data in last.items() if data is not None]
    known = _known(db, source, kept)
    db.executemany(
        "DELETE FROM sweep_keys WHERE source = ? AND key = ?", [(source, k) for k, d in last.items() if d is None]
    )
    # Rewrite only what changed: a key delivered again within one epoch (a timestamp source's updates) costs a read.
    db.executemany(
        "UPDATE sweep_keys SET key_data = ?, epoch = ? WHERE source = ? AND key = ?",
        [(last[k], epoch, source, k) for k in kept if k in known and known[k] != (last[k], epoch)],
    )
    new = [k for k in kept if k not in known]
    db.executemany(
        "INSERT INTO sweep_keys (source, key, key_data, epoch, id) VALUES (?, ?, ?, ?, ?)",
        [(source, k, last[k], epoch, next_id + i) for i, k in enumerate(new)],
    )
    if new:
        db.execute("UPDATE sweep_sources SET next_id = ? WHERE source = ?", (next_id + len(new), source))


def hand_over(db: sqlite3.Connection, source: str) -> None:
    """A takeover (outbox/handover.py): a sweep under way ends unfinished; the next one starts when due."""
    db.execute("DELETE FROM sweep_seen WHERE source = ?", (source,))
    _state(db, source)
    db.execute("UPDATE sweep_sources SET running = 0, after = NULL WHERE source = ?", (source,))


def reset(db: sqlite3.Connection, source: str, within: str, args: Sequence[str], *, exact: bool) -> None:
    """As `keyed.reset`: exact, forget the keys this outbox delivered; else keep them for the next sweep."""
    if exact:
        db.execute(f"DELETE FROM sweep_keys WHERE source = ? {within}", (source, *args))


def restore(db: sqlite3.Connection, source: str, staged: str, within: str, args: Sequence[str], base: int) -> None:
    """As `keyed.restore`; restored keys carry the current epoch: the next sweep compares them."""
    epoch = _state(db, source)[0]
    db.execute(f"DELETE FROM sweep_keys WHERE source = ? AND key IN "
               f"(SELECT key FROM {staged} WHERE source = ? {within} AND key_data IS NULL)", (source, source, *args))
    db.execute(
        f"INSERT INTO sweep_keys (source, key, key_data, epoch, id) "
        f"SELECT source, key, key_data, ?, ? + ord FROM {staged} WHERE source = ? {within} AND key_data IS NOT NULL "
        "ON CONFLICT (source, key) DO UPDATE SET key_data = excluded.key_data, epoch = excluded.epoch",
        (epoch, base, source, *args),
    )


def next_id(db: sqlite3.Connection, source: str) -> int:
    return _state(db, source)[1]


def move_ids(db: sqlite3.Connection, source: str, to: int) -> None:
    """Ids below `to` are taken (a takeover restored keys up to there)."""
    db.execute("UPDATE sweep_sources SET next_id = max(next_id, ?) WHERE source = ?", (to, source))


def begin(db: sqlite3.Connection, source: str, interval: float, now: float) -> Sweep | None:
    """The sweep under way, or a new one if one is due; None if not due (or nothing delivered to sweep).

    Inside the caller's transaction, which must commit before the listing starts.
    """
    _epoch, _next_id, number, running, after, started = _state(db, source)
    if running:
        return Sweep(number, after)
    # A clock set back does not postpone the sweep by as much.
    if started is not None and 0 <= now - started < interval:
        return None
    if db.execute("SELECT 1 FROM sweep_keys WHERE source = ? LIMIT 1", (source,)).fetchone() is None:
        return None
    number = max(int(now * 1000), number + 1)
    db.execute(
        "UPDATE sweep_sources SET running = 1, number = ?, cutoff = epoch, epoch = epoch + 1, after = NULL, "
        "started = ? WHERE source = ?",
        (number, now, source),
    )
    return Sweep(number, None)


def mark(db: sqlite3.Connection, source: str, keys: Sequence[str | None], after: str) -> None:
    """These keys are in the listing, which stands at `after` (inside the caller's transaction)."""
    number = _state(db, source)[2]
    unique = list(dict.fromkeys(k for k in keys if k is not None))
    ids = array(IDS)
    for start in range(0, len(unique), CHUNK):
        chunk = unique[start : start + CHUNK]
        ids.extend(
            row[0]
            for row in db.execute(
                f"SELECT id FROM sweep_keys WHERE source = ? AND key IN ({','.join('?' * len(chunk))})",
                (source, *chunk),
            )
        )
    if ids:
        db.execute("INSERT INTO sweep_seen (source, number, ids) VALUES (?, ?, ?)", (source, number, ids.tobytes()))
    db.execute("UPDATE sweep_sources SET after = ? WHERE source = ?", (after, source))


def finish(db: sqlite3.Connection, source: str, encode: Encode) -> Iterator[bytes]:
    """The listing is complete: a `deleted` event per compared key it did not see, then forget them.

    A generator over a cursor; the caller must exhaust it inside its transaction (the
    sweep ends when it is exhausted). Memory: one byte per key id, and the deleted keys.
    """
    row = db.execute("SELECT number, cutoff, next_id FROM sweep_sources WHERE source = ?", (source,)).fetchone()
    number, cutoff = int(row[0]), int(row[1])
    position = Sweep(number, None).position
    seen = seen_marks(db.execute("SELECT ids FROM sweep_seen WHERE source = ? AND number = ?", (source, number)),
                      int(row[2]))
    # The deleted keys are held (not yielded under the open cursor, whose table they leave) and sent in
    # the order they were first delivered.
    gone: list[tuple[int, str, str]] = []
    keys = db.execute("SELECT id, key, key_data FROM sweep_keys WHERE source = ? AND epoch <= ?", (source, cutoff))
    while rows := keys.fetchmany(10_000):
        gone.extend(row for row in rows if not seen[row[0]])
    gone.sort()
    for _id, key, key_data in gone:
        yield encode(DELETED, key, position, orjson.loads(key_data))
    db.executemany("DELETE FROM sweep_keys WHERE source = ? AND key = ?", [(source, key) for _id, key, _data in gone])
    db.execute("DELETE FROM sweep_seen WHERE source = ?", (source,))
    db.execute("UPDATE sweep_sources SET running = 0, after = NULL WHERE source = ?", (source,))


def _state(db: sqlite3.Connection, source: str) -> tuple[int, int, int, int, str | None, float | None]:
    """(epoch, next_id, number, running, after, started) of the source, its row made if new."""
    row = db.execute(
        "SELECT epoch, next_id, number, running, after, started FROM sweep_sources WHERE source = ?", (source,)
    ).fetchone()
    if row is None:
        db.execute("INSERT INTO sweep_sources (source) VALUES (?)", (source,))
        return 1, 1, 0, 0, None, None
    return int(row[0]), int(row[1]), int(row[2]), int(row[3]), row[4], row[5]


def _known(db: sqlite3.Connection, source: str, keys: Sequence[str]) -> dict[str, tuple[str, int]]:
    """key -> (key data, epoch) of those of `keys` already recorded."""
    found: dict[str, tuple[str, int]] = {}
    for start in range(0, len(keys), CHUNK):
        chunk = keys[start : start + CHUNK]
        for key, key_data, epoch in db.execute(
            f"SELECT key, key_data, epoch FROM sweep_keys WHERE source = ? AND key IN ({','.join('?' * len(chunk))})",
            (source, *chunk),
        ):
            found[key] = (key_data, epoch)
    return found


def loads_event(event: bytes) -> dict[str, Any]:
    """An event as published (orjson, or json for integers beyond 64 bits)."""
    try:
        parsed: dict[str, Any] = orjson.loads(event)
    except orjson.JSONDecodeError:  # integers beyond 64 bits (legacy NUMERIC(30) keys)
        parsed = json.loads(event)
    return parsed
