"""The durable outbox: one local SQLite file in WAL mode.

A batch of records, its dead letters and the source's new position commit in
one transaction, so a crash at any instant keeps all of them or none. The relay
reads records in `seq` order and, once Redis holds them, marks them published
(and deletes them) in another single transaction.
"""

from __future__ import annotations

import datetime as dt
import errno
import sqlite3
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from outbox import keyed, sweep

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    source TEXT NOT NULL,
    stream TEXT NOT NULL,
    position TEXT NOT NULL,
    event BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS positions (
    source TEXT PRIMARY KEY,
    position TEXT,
    polled_at TEXT,
    rows_read INTEGER NOT NULL DEFAULT 0,
    rows_published INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    error_at TEXT
);
CREATE TABLE IF NOT EXISTS streams (
    stream TEXT PRIMARY KEY,
    published_seq INTEGER NOT NULL,
    published_at TEXT,
    error TEXT,
    error_at TEXT
);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY,
    source TEXT NOT NULL,
    position TEXT NOT NULL,
    reason TEXT NOT NULL,
    raw TEXT NOT NULL,
    created_at TEXT NOT NULL
);
"""


_INSERT_RECORD = "INSERT INTO records (source, stream, position, event) VALUES (?, ?, ?, ?)"


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


class OutboxError(Exception):
    """The outbox file cannot be used: one line naming the file, what happened and how to recover."""


_FULL = ("SQLITE_FULL",)
_READONLY = ("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM", "SQLITE_AUTH")
_DAMAGED = ("SQLITE_NOTADB", "SQLITE_CORRUPT")


def explain(path: Path, exc: BaseException) -> OutboxError:
    """Turn a SQLite or OS error about the outbox into the operator's one line (what, where, what to do)."""
    detail = " ".join(str(exc).split()) or type(exc).__name__
    name = getattr(exc, "sqlite_errorname", "") or ""
    code = exc.errno if isinstance(exc, OSError) else None
    if name.startswith(_FULL) or code == errno.ENOSPC:
        return OutboxError(
            f"outbox {path}: the disk is full ({detail}); nothing already in the outbox is lost: "
            f"free space on the file system of {path.parent}, then start straw again"
        )
    if name.startswith(_DAMAGED):
        return OutboxError(
            f"outbox {path} is damaged or not an outbox ({detail}); move it aside (with its -wal and -shm files, "
            f"e.g. mv {path} {path}.broken): a new outbox starts from the stream's checkpoint in Redis, "
            "so nothing published is repeated and the rest is read from the sources again"
        )
    if name.startswith(_READONLY) or code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return OutboxError(
            f"outbox {path}: cannot write ({detail}); make the file, its -wal and -shm files and the folder "
            f"{path.parent} writable for this user (or mount the file system read-write), then start straw again"
        )
    if name.startswith("SQLITE_IOERR") or isinstance(exc, OSError):
        return OutboxError(
            f"outbox {path}: input/output error ({detail}); check the disk holding {path.parent}, "
            "then start straw again"
        )
    return OutboxError(f"outbox {path}: {detail}")


@contextmanager
def guarded(path: Path) -> Iterator[None]:
    """SQLite's errors about the outbox file become an OutboxError that says what to do.

    Only SQLite's: an OSError raised by the caller's code inside a transaction (an encoder,
    say) is not about the file, and passes as it is.
    """
    try:
        yield
    except sqlite3.DatabaseError as exc:
        if isinstance(exc, sqlite3.IntegrityError | sqlite3.ProgrammingError):
            raise  # a bug of ours, not the file's state
        raise explain(path, exc) from exc


class Pending(NamedTuple):
    seq: int
    source: str
    position: str
    event: bytes


@dataclass(frozen=True, slots=True)
class SourceState:
    source: str
    position: str | None
    polled_at: str | None
    rows_read: int
    rows_published: int
    error: str | None
    error_at: str | None


@dataclass(frozen=True, slots=True)
class StreamState:
    stream: str
    published_seq: int
    published_at: str | None
    backlog: int
    error: str | None
    error_at: str | None


class Outbox:
    """Not shared across threads: open one per thread or process (SQLite handles the rest)."""

    def __init__(self, path: Path, *, synchronous: str = "FULL") -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise explain(path, exc) from exc
        self._tracked: dict[str, tuple[str, ...]] = {}  # source -> key fields, for its key sweep
        with guarded(path):
            self.db = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
            try:
                self.db.execute("PRAGMA journal_mode=WAL")
                # FULL: a commit survives power loss too, not only a killed process.
                self.db.execute(f"PRAGMA synchronous={synchronous}")
                self.db.executescript(SCHEMA)
                keyed.create(self.db)
                sweep.create(self.db)
                self.identity = self._identity()
            except BaseException:
                self.db.close()
                raise

    def _identity(self) -> str:
        row = self.db.execute("SELECT value FROM meta WHERE key = 'identity'").fetchone()
        if row:
            return str(row[0])
        self.db.execute("INSERT OR IGNORE INTO meta VALUES ('identity', ?)", (uuid.uuid4().hex,))
        return str(self.db.execute("SELECT value FROM meta WHERE key = 'identity'").fetchone()[0])

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """A write transaction that takes the lock up front (no upgrade deadlock with the other process).

        A full disk may end the transaction inside SQLite already (it rolls back by itself),
        hence the check before our ROLLBACK; either way nothing of it was committed.
        """
        with guarded(self.path):
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    # --- the poller's side -------------------------------------------------

    def append(
        self,
        source: str,
        stream: str,
        events: Sequence[tuple[str, bytes]],
        dead: Iterable[tuple[str, str, str]],
        position: str,
        rows_read: int,
    ) -> None:
        """Commit records, dead letters (position, reason, raw) and the new position together."""
        with self._transaction():
            self._write(source, stream, events, dead, position, rows_read)
            key_fields = self._tracked.get(source)
            if key_fields is not None:
                sweep.record(self.db, source, key_fields, [event for _pos, event in events])

    def append_keyed(
        self,
        source: str,
        stream: str,
        changes: Sequence[keyed.Change],
        dead: Iterable[tuple[str, str, str]],
        position: str,
        rows_read: int,
        *,
        complete: bool,
        encode: keyed.Encode,
        unchanged: Sequence[int] = (),
    ) -> int:
        """`append` for a keyed source: only new, changed and deleted keys become records.

        `complete`: this batch ends a complete listing; keys not seen since the previous
        one become `deleted` records at `position`. `unchanged`: ids of keys listed again just
        as delivered before (`Mapper.map_keyed` finds them). Returns the number of records written.
        """
        db = self.db
        with self._transaction():
            events = keyed.apply(db, source, changes, encode, unchanged)
            self._write(source, stream, events, dead, position, rows_read)
            written = len(events)
            if complete:
                swept = [0]

                def deleted() -> Iterator[tuple[str, str, str, bytes]]:
                    for pos, event in keyed.sweep(db, source, position, encode):
                        swept[0] += 1
                        yield source, stream, pos, event

                db.executemany(_INSERT_RECORD, deleted())
                written += swept[0]
        return written

    # --- key sweeps (hard deletes of incremental sources, see `sweep.py`) ---

    def track_keys(self, source: str, key_fields: Sequence[str]) -> None:
        """From now on, `append` records the keys it delivers for `source` (its events' data has `key_fields`)."""
        self._tracked[source] = tuple(key_fields)

    def sweep_begin(self, source: str, interval: float, now: float) -> sweep.Sweep | None:
        """The key sweep under way, or a new one if due (committed before the caller lists keys)."""
        with self._transaction():
            return sweep.begin(self.db, source, interval, now)

    def sweep_mark(self, source: str, keys: Sequence[str | None], after: str) -> None:
        """A batch of the sweep's listing: its keys (as event subjects) and where the listing stands."""
        with self._transaction():
            sweep.mark(self.db, source, keys, after)

    def sweep_finish(self, source: str, stream: str, encode: sweep.Encode) -> int:
        """The listing is complete: commit a `deleted` record per vanished key and end the sweep.

        The records carry the source's stored position: the checkpoint takes it from
        them, and it must stay the watermark. Returns the number of records written.
        """
        db = self.db
        with self._transaction():
            position = self.position(source) or ""
            written = [0]

            def deleted() -> Iterator[tuple[str, str, str, bytes]]:
                for event in sweep.finish(db, source, encode):
                    written[0] += 1
                    yield source, stream, position, event

            db.executemany(_INSERT_RECORD, deleted())
        return written[0]

    def digests(self, source: str, keys: Sequence[str]) -> dict[str, tuple[int, bytes]]:
        """A keyed source's stored id and digest for each of these keys it knows (see `keyed.py`)."""
        return keyed.digests(self.db, source, keys)

    def _write(
        self,
        source: str,
        stream: str,
        events: Sequence[tuple[str, bytes]],
        dead: Iterable[tuple[str, str, str]],
        position: str,
        rows_read: int,
    ) -> None:
        now = _now()
        db = self.db
        db.executemany(_INSERT_RECORD, [(source, stream, pos, event) for pos, event in events])
        db.executemany(
            "INSERT INTO dead_letters (source, position, reason, raw, created_at) VALUES (?, ?, ?, ?, ?)",
            [(source, pos, reason, raw, now) for pos, reason, raw in dead],
        )
        db.execute(
            "INSERT INTO positions (source, position, polled_at, rows_read) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (source) DO UPDATE SET position = excluded.position, polled_at = excluded.polled_at, "
            "rows_read = rows_read + excluded.rows_read, error = NULL, error_at = NULL",
            (source, position, now, rows_read),
        )

    def position(self, source: str) -> str | None:
        row = self.db.execute("SELECT position FROM positions WHERE source = ?", (source,)).fetchone()
        return row[0] if row else None

    def polled(self, source: str, error: str | None = None) -> None:
        """Note a poll that changed no position: its time, or the error that stopped it."""
        now = _now()
        with guarded(self.path):
            self._polled(source, now, error)

    def _polled(self, source: str, now: str, error: str | None) -> None:
        self.db.execute(
            "INSERT INTO positions (source, polled_at, error, error_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (source) DO UPDATE SET polled_at = excluded.polled_at, error = excluded.error, "
            "error_at = excluded.error_at",
            (source, now, error, now if error else None),
        )

    # --- the relay's side --------------------------------------------------

    def stream_known(self, stream: str) -> bool:
        return self.db.execute("SELECT 1 FROM streams WHERE stream = ?", (stream,)).fetchone() is not None

    def adopt(self, stream: str, seq: int, positions: dict[str, str]) -> None:
        """First use of `stream` by this outbox: continue where its Redis checkpoint stands.

        Our `seq` moves above the checkpoint's, and sources that this outbox has never
        polled start at the positions the checkpoint holds (failover to a new host
        neither loses nor repeats).
        """
        db = self.db
        with self._transaction():
            if db.execute("SELECT 1 FROM streams WHERE stream = ?", (stream,)).fetchone():
                return
            current = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'records'").fetchone()
            if current is None:
                db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('records', ?)", (seq,))
            elif current[0] < seq:
                db.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'records'", (seq,))
            for source, pos in positions.items():
                db.execute(
                    "INSERT INTO positions (source, position) VALUES (?, ?) ON CONFLICT (source) DO NOTHING",
                    (source, pos),
                )
            db.execute("INSERT INTO streams (stream, published_seq) VALUES (?, ?)", (stream, seq))

    def published_seq(self, stream: str) -> int:
        row = self.db.execute("SELECT published_seq FROM streams WHERE stream = ?", (stream,)).fetchone()
        return int(row[0]) if row else 0

    def pending(self, stream: str, after: int, limit: int) -> list[Pending]:
        """The next records to publish, in order."""
        rows = self.db.execute(
            "SELECT seq, source, position, event FROM records WHERE seq > ? AND stream = ? ORDER BY seq LIMIT ?",
            (after, stream, limit),
        ).fetchall()
        return list(map(Pending._make, rows))

    def mark_published(self, stream: str, upto: int, counts: dict[str, int] | None = None) -> int:
        """Everything of `stream` up to `upto` is in Redis: count it per source and drop it.

        `counts` (records per source), when the caller knows them, saves counting here.
        """
        db = self.db
        with self._transaction():
            after = self.published_seq(stream)
            if upto <= after:
                return 0
            if counts is None:
                counted = db.execute(
                    "SELECT source, count(*) FROM records WHERE seq > ? AND seq <= ? AND stream = ? GROUP BY source",
                    (after, upto, stream),
                ).fetchall()
                counts = dict(counted)
            for source, count in counts.items():
                db.execute(
                    "UPDATE positions SET rows_published = rows_published + ? WHERE source = ?", (count, source)
                )
            db.execute("DELETE FROM records WHERE seq > ? AND seq <= ? AND stream = ?", (after, upto, stream))
            db.execute(
                "UPDATE streams SET published_seq = ?, published_at = ?, error = NULL, error_at = NULL "
                "WHERE stream = ?",
                (upto, _now(), stream),
            )
        return sum(counts.values())

    def stream_error(self, stream: str, error: str | None) -> None:
        with guarded(self.path):
            self.db.execute(
                "UPDATE streams SET error = ?, error_at = ? WHERE stream = ?",
                (error, _now() if error else None, stream),
            )

    # --- reading for status ------------------------------------------------

    def sources(self) -> list[SourceState]:
        rows = self.db.execute(
            "SELECT source, position, polled_at, rows_read, rows_published, error, error_at "
            "FROM positions ORDER BY source"
        ).fetchall()
        return [SourceState(*row) for row in rows]

    def streams(self) -> list[StreamState]:
        out = []
        for stream, seq, at, error, error_at in self.db.execute(
            "SELECT stream, published_seq, published_at, error, error_at FROM streams ORDER BY stream"
        ).fetchall():
            backlog = self.db.execute(
                "SELECT count(*) FROM records WHERE seq > ? AND stream = ?", (seq, stream)
            ).fetchone()[0]
            out.append(StreamState(stream, seq, at, backlog, error, error_at))
        return out

    def backlog(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM records").fetchone()[0])

    def dead_letters(self, source: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
        query = "SELECT id, source, position, reason, raw, created_at FROM dead_letters"
        params: tuple[Any, ...] = ()
        if source:
            query, params = query + " WHERE source = ?", (source,)
        rows = self.db.execute(query + " ORDER BY id DESC LIMIT ?", (*params, limit)).fetchall()
        keys = ("id", "source", "position", "reason", "raw", "created_at")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def dead_letter(self, letter_id: int) -> dict[str, Any] | None:
        row = self.db.execute(
            "SELECT id, source, position, reason, raw, created_at FROM dead_letters WHERE id = ?", (letter_id,)
        ).fetchone()
        keys = ("id", "source", "position", "reason", "raw", "created_at")
        return None if row is None else dict(zip(keys, row, strict=True))

    def resolve_dead_letter(
        self, letter_id: int, source: str, stream: str, event: tuple[str, bytes] | None
    ) -> bool:
        """Delete a dead letter and, with `event` (position, bytes: the row maps now), queue that record, in
        one transaction; the source's position does not move. False if it was gone already."""
        with self._transaction():
            if self.db.execute("DELETE FROM dead_letters WHERE id = ?", (letter_id,)).rowcount == 0:
                return False
            if event is not None:
                self.db.execute(_INSERT_RECORD, (source, stream, event[0], event[1]))
        return True

    def dead_letter_counts(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT source, count(*) FROM dead_letters GROUP BY source").fetchall())
