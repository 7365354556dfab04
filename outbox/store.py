"""The durable outbox: one local SQLite file in WAL mode.

A batch of records, its dead letters and the source's new position commit in
one transaction, so a crash at any instant keeps all of them or none. The relay
reads records in `seq` order and, once the bus holds them, marks them published
in another single transaction.

A row of `records` holds a run of `n` consecutive records of one source and stream
(a poll batch, cut at `row_records`): `seq` is the run's last seq, so the row holds
seq `seq - n + 1 .. seq`. A row of one record is stored as before this layout (plain
`position`, `sizes` NULL); a longer one keeps its positions as a JSON array, its events
concatenated and their byte sizes in `sizes` ("460,461,…"). One row per batch instead of
per record because SQLite's per-row work (a B-tree insert, an index entry, the statement)
was over a quarter of the poller's CPU per record. Published records stay a while
(`outbox.retain`): a bus that loses acknowledged writes (a failover, a restart from an older
snapshot) rolls its checkpoint back, and the relay re-publishes them from here.
"""

from __future__ import annotations

import datetime as dt
import errno
import os
import sqlite3
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import accumulate, islice, repeat
from operator import itemgetter
from pathlib import Path
from typing import Any

import orjson

from bus.seam import Outgoing
from outbox import handover, keyed, sweep

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- The event(s) last: a row's other columns are then read without walking the blob's overflow pages.
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    source TEXT NOT NULL,
    stream TEXT NOT NULL,
    position TEXT NOT NULL,
    n INTEGER NOT NULL DEFAULT 1,
    sizes TEXT,
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
-- One row per publish: what the retention walks (by age, count, bytes) without reading records.
CREATE TABLE IF NOT EXISTS published_marks (
    seq INTEGER PRIMARY KEY,
    stream TEXT NOT NULL,
    at REAL NOT NULL,
    records INTEGER NOT NULL,
    bytes INTEGER NOT NULL
);
-- Nothing of the stream at or below `pruned_seq` is in this outbox (pruned, or published by another outbox).
CREATE TABLE IF NOT EXISTS retention (stream TEXT PRIMARY KEY, pruned_seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS rollbacks (
    id INTEGER PRIMARY KEY,
    stream TEXT NOT NULL,
    bus_seq INTEGER NOT NULL,
    outbox_seq INTEGER NOT NULL,
    detected_at TEXT NOT NULL,
    repaired_at TEXT,
    missing_from INTEGER,
    missing_to INTEGER
);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY,
    source TEXT NOT NULL,
    position TEXT NOT NULL,
    reason TEXT NOT NULL,
    raw TEXT NOT NULL,
    created_at TEXT NOT NULL
);
-- A source's own state, committed with its position (`RawBatch.memo`): the id gaps a settle window watches.
CREATE TABLE IF NOT EXISTS memos (source TEXT PRIMARY KEY, memo TEXT NOT NULL);
-- An outbox from before retention deleted what it published: it holds nothing at or below that.
INSERT OR IGNORE INTO retention (stream, pruned_seq) SELECT stream, published_seq FROM streams;
"""


# Pending and retained records of one stream are one range of this index (retained rows of other streams
# are never scanned by `pending` or the backlog counts); with `n` in it, the counts read nothing else.
_INDEX = "CREATE INDEX IF NOT EXISTS records_stream_seq_n ON records (stream, seq, n)"


def migrate(db: sqlite3.Connection) -> None:
    """An outbox written before rows held runs of records gets their columns and index, in place.

    Its rows stay as they are: each is a run of one (`n` 1, `sizes` NULL). Taken under the write
    lock, since the runner and its relay child open the file at the same moment.
    """
    if "n" in _columns(db):
        db.execute(_INDEX)
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        if "n" not in _columns(db):
            db.execute("ALTER TABLE records ADD COLUMN n INTEGER NOT NULL DEFAULT 1")
            db.execute("ALTER TABLE records ADD COLUMN sizes TEXT")
        db.execute(_INDEX)
        db.execute("DROP INDEX IF EXISTS records_stream_seq")  # the new index covers what it served
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _columns(db: sqlite3.Connection) -> set[str]:
    return {row[1] for row in db.execute("PRAGMA table_info(records)")}


def runs(db: sqlite3.Connection) -> bool:
    """Whether this outbox's rows hold runs of records (`n`): False for one no straw of this version opened
    yet, which readers that do not write (status, metrics, `straw check`) read as one record per row."""
    return "n" in _columns(db)


def oldest_pending_query(runs: bool = True) -> str:
    """SQL (stream, published seq) -> the `time` of the stream's oldest waiting record (`runs`: see `runs`).

    The event's own `time` says when the change was observed: the age of a record waiting to be published.
    Of a run, the first event (its first size is the leading number of `sizes`), which is the oldest
    waiting one unless the run was published in part: then an estimate, older than the truth."""
    event = "CASE WHEN sizes IS NULL THEN event ELSE substr(event, 1, CAST(sizes AS INTEGER)) END" if runs else "event"
    return (f"SELECT json_extract(CAST({event} AS TEXT), '$.time') FROM records "
            "WHERE stream = ? AND seq > ? ORDER BY seq LIMIT 1")


def waiting_sum(n: str, seq: str, published: str) -> str:
    """SQL: how many records of a row (last seq `seq`, `n` records) are above `published`; for rows above it."""
    return f"min({n}, {seq} - {published})"


def backlog_query(runs: bool = True) -> str:
    """SQL (`runs`: see `runs`): pending records over all streams, each stream one range of the index
    (retained rows are never read); the stream names come from that index too (a skip-scan), so a stream
    not adopted yet counts whole."""
    n = "r.n" if runs else "1"
    return f"""
WITH RECURSIVE names(stream) AS (
    SELECT min(stream) FROM records
    UNION ALL SELECT (SELECT min(stream) FROM records WHERE stream > names.stream) FROM names WHERE stream IS NOT NULL
)
SELECT coalesce(sum((
    SELECT coalesce(sum({waiting_sum(n, "r.seq", "p.published")}), 0) FROM records r
    WHERE r.stream = p.stream AND r.seq > p.published
)), 0) FROM (
    SELECT names.stream, coalesce(s.published_seq, 0) AS published FROM names
    LEFT JOIN streams s ON s.stream = names.stream WHERE names.stream IS NOT NULL
) p
"""


# A row's seq is its run's last: the next free seq (AUTOINCREMENT's counter, which explicit seqs move too) + n - 1.
_INSERT_RUN = (
    "INSERT INTO records (seq, source, stream, position, n, sizes, event) "
    "VALUES (coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'records'), 0) + ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_AT = "INSERT INTO records (seq, source, stream, position, n, sizes, event) VALUES (?, ?, ?, ?, ?, ?, ?)"
_ROW = "seq, n, source, position, sizes, event"

# Records per outbox row: the relay's default batch, so a round publishes one row.
ROW_RECORDS = 1000
# And bytes of events per row at most (a single larger event is a row of its own): wide rows make big
# events, and SQLite refuses a value over 1 GB.
ROW_BYTES = 32 << 20


def _run(records: Sequence[tuple[str, bytes]]) -> tuple[str, int, str | None, bytes]:
    """A run's (position, n, sizes, event) columns."""
    if len(records) == 1:
        return records[0][0], 1, None, records[0][1]
    positions, events = zip(*records, strict=True)
    return orjson.dumps(positions).decode(), len(records), ",".join(map(str, map(len, events))), b"".join(events)


def _by_size(chunk: list[tuple[str, bytes]]) -> Iterator[list[tuple[str, bytes]]]:
    """`chunk` in order, cut where its events pass ROW_BYTES (the whole chunk, as a rule)."""
    if sum(map(len, map(itemgetter(1), chunk))) <= ROW_BYTES:
        yield chunk
        return
    part: list[tuple[str, bytes]] = []
    size = 0
    for record in chunk:
        if part and size + len(record[1]) > ROW_BYTES:
            yield part
            part, size = [], 0
        part.append(record)
        size += len(record[1])
    yield part


def unpack(seq: int, n: int, source: str, position: str, sizes: str | None, event: bytes, *,
           after: int = 0) -> list[Pending]:
    """A row's records above seq `after`."""
    if sizes is None:
        return [Pending(seq, source, position, event)] if seq > after else []
    positions = orjson.loads(position)
    ends = list(accumulate(map(int, sizes.split(","))))
    if not (len(positions) == len(ends) == n and ends[-1] == len(event)):
        raise OutboxError(f"outbox row seq {seq} is damaged: {n} records, {len(positions)} positions, "
                          f"{len(ends)} sizes summing to {ends[-1]} of {len(event)} bytes")
    first = seq - n + 1
    skip = max(0, after - first + 1)
    # map() rather than a comprehension: the relay unpacks every record it sends, and this halves it.
    events = map(event.__getitem__, map(slice, [0, *ends[:-1]][skip:], ends[skip:]))
    fields = zip(range(first + skip, seq + 1), repeat(source), positions[skip:], events)
    return list(map(tuple.__new__, repeat(Pending), fields))


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


Pending = Outgoing  # a record waiting in the outbox is what the relay hands the bus


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
class Keep:
    """What `prune` keeps of each stream's published records: the newest, while all three hold."""

    age: float = 86_400.0  # seconds since published
    records: int = 1_000_000
    size: int = 1 << 30  # bytes of events


@dataclass(frozen=True, slots=True)
class Retained:
    """Published records of a stream still in the outbox, to repair a rollback of the bus."""

    records: int
    first: int | None  # lowest retained seq
    last: int | None


@dataclass(frozen=True, slots=True)
class Rollback:
    """A rollback of the bus this outbox noticed: the checkpoint at `bus_seq`, below `outbox_seq`."""

    stream: str
    bus_seq: int
    outbox_seq: int
    detected_at: str
    repaired_at: str | None
    missing: tuple[int, int] | None  # seq range no longer retained: the stream stopped

    def describe(self) -> str:
        lost = f"bus checkpoint seq {self.bus_seq} below published seq {self.outbox_seq}"
        if self.missing:
            return f"{lost}: seq {self.missing[0]}..{self.missing[1]} not retained, stream stopped"
        if self.repaired_at:
            return f"{lost}: re-published seq {self.bus_seq + 1}..{self.outbox_seq} at {self.repaired_at}"
        return f"{lost}: re-publishing seq {self.bus_seq + 1}..{self.outbox_seq}"


@dataclass(frozen=True, slots=True)
class StreamState:
    stream: str
    published_seq: int
    published_at: str | None
    backlog: int
    error: str | None
    error_at: str | None
    retained: Retained = Retained(0, None, None)
    rollback: Rollback | None = None  # the latest


_DONE = object()  # the end of a generator of steps

# How often polls that found nothing are written to the outbox (`Outbox.polled`).
IDLE_NOTES_EVERY = 1.0


class Outbox:
    """Not shared across threads: open one per thread or process (SQLite handles the rest)."""

    def __init__(self, path: Path, *, synchronous: str = "FULL", row_records: int = ROW_RECORDS) -> None:
        self.path = path
        self.row_records = max(1, row_records)  # records per row at most (a poll batch is cut at it)
        try:
            # Owner-only: the outbox holds business data (and dead letters hold raw legacy rows). SQLite
            # creates the -wal and -shm files with the mode of the database file, so they follow.
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not path.exists():
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        except OSError as exc:
            raise explain(path, exc) from exc
        self._tracked: dict[str, tuple[str, ...]] = {}  # source -> key fields, for its key sweep
        # Polls that found nothing, noted in memory and written together (see `polled`).
        self._idle: dict[str, str] = {}
        self._idle_written = time.monotonic()
        with guarded(path):
            self.db = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
            try:
                self.db.execute("PRAGMA journal_mode=WAL")
                # FULL: a commit survives power loss too, not only a killed process.
                self.db.execute(f"PRAGMA synchronous={synchronous}")
                self.db.executescript(SCHEMA)
                migrate(self.db)
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
        try:
            self.flush_polled()
        finally:
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
        memo: str | None = None,
    ) -> None:
        """Commit records, dead letters (position, reason, raw) and the new position together, and the
        source's `memo` if given (see `memo`)."""
        with self._transaction():
            self._write(source, stream, events, dead, position, rows_read)
            self._memo(source, memo)
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
        memo: str | None = None,
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
            self._memo(source, memo)
            written = len(events)
            if complete:
                written += self._insert(source, stream, keyed.sweep(db, source, position, encode))
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
            return self._insert(source, stream, ((position, event) for event in sweep.finish(db, source, encode)))

    def digests(self, source: str, keys: Sequence[str]) -> dict[str, tuple[int, bytes]]:
        """A keyed source's stored id and digest for each of these keys it knows (see `keyed.py`)."""
        return keyed.digests(self.db, source, keys)

    def by_digest(self, source: str, ends: Sequence[str], listed: Sequence[bytes | None]) -> list[int | None]:
        """A digest listing's page compared by the database's digests alone (see `keyed.by_digest`)."""
        return keyed.by_digest(self.db, source, ends, listed)

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
        self._idle.pop(source, None)  # this write notes a newer poll
        self._insert(source, stream, events)
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

    def _memo(self, source: str, memo: str | None) -> None:
        if memo is not None:
            self.db.execute("INSERT OR REPLACE INTO memos (source, memo) VALUES (?, ?)", (source, memo))

    def _insert(self, source: str, stream: str, records: Iterable[tuple[str, bytes]]) -> int:
        """Write (position, event) records as rows of `row_records` at most, in order; return how many."""
        written = 0
        it = iter(records)
        while chunk := list(islice(it, self.row_records)):
            for part in _by_size(chunk):
                self.db.execute(_INSERT_RUN, (len(part), source, stream, *_run(part)))
            written += len(chunk)
        return written

    def _split(self, stream: str, at: int) -> None:
        """Make `at` a row boundary of `stream`: a row holding seq `at` and `at + 1` becomes two rows.

        Before a cut at a seq that may fall inside a run (a checkpoint another outbox wrote)."""
        row = self.db.execute(
            f"SELECT {_ROW} FROM records WHERE stream = ? AND seq > ? ORDER BY seq LIMIT 1", (stream, at)
        ).fetchone()
        if row is None or row[0] - row[1] >= at:
            return
        records = unpack(*row)
        head = [(r.position, r.event) for r in records if r.seq <= at]
        tail = [(r.position, r.event) for r in records if r.seq > at]
        self.db.execute("DELETE FROM records WHERE seq = ?", (row[0],))
        source = row[2]
        for last, part in ((at, head), (row[0], tail)):
            self.db.execute(_INSERT_AT, (last, source, stream, *_run(part)))

    def events(self, stream: str | None = None, after: int = 0) -> list[Pending]:
        """Every record held (published or not), in seq order: for tests and tools, not the relay's path."""
        where, params = ("WHERE stream = ? AND seq > ?", (stream, after)) if stream else ("WHERE seq > ?", (after,))
        rows = self.db.execute(f"SELECT {_ROW} FROM records {where} ORDER BY seq", params).fetchall()
        return [record for row in rows for record in unpack(*row, after=after)]

    def position(self, source: str) -> str | None:
        row = self.db.execute("SELECT position FROM positions WHERE source = ?", (source,)).fetchone()
        return row[0] if row else None

    def memo(self, source: str) -> str | None:
        """What the source last committed with its position besides it (`RawBatch.memo`), if anything."""
        row = self.db.execute("SELECT memo FROM memos WHERE source = ?", (source,)).fetchone()
        return row[0] if row else None

    def polled(self, source: str, error: str | None = None) -> None:
        """Note a poll that changed no position: its time, or the error that stopped it.

        A poll that found nothing is only a time for `straw status`: it is kept in memory
        and written with the others at most once every IDLE_NOTES_EVERY seconds (one
        durable commit a second instead of one per idle poll: 300 idle sources made
        that fsync most of straw's idle CPU). Positions never wait: they commit with
        their records. An error is written at once.
        """
        if error is None:
            self._idle[source] = _now()
            self.flush_polled(at_most_every=IDLE_NOTES_EVERY)
            return
        self._idle.pop(source, None)
        with guarded(self.path):
            self._polled(source, _now(), error)

    def flush_polled(self, *, at_most_every: float = 0.0) -> None:
        """Write the idle polls noted in memory (unless the last write is younger than `at_most_every` s)."""
        now = time.monotonic()
        if not self._idle or now - self._idle_written < at_most_every:
            return
        notes, self._idle, self._idle_written = self._idle, {}, now
        with self._transaction():
            for source, polled_at in notes.items():
                self._polled(source, polled_at, None)

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
            # What the checkpoint covers was published by another outbox (or none): not ours to re-publish.
            db.execute("INSERT OR REPLACE INTO retention (stream, pruned_seq) VALUES (?, ?)", (stream, seq))

    def owe_take_over(self, stream: str) -> None:
        """The lease's claim moved `stream`'s checkpoint to this outbox: `take_over` is owed until it commits."""
        with self._transaction():
            self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, '1')", (f"take_over:{stream}",))

    def owes_take_over(self, stream: str) -> bool:
        return self.db.execute("SELECT 1 FROM meta WHERE key = ?", (f"take_over:{stream}",)).fetchone() is not None

    def stage_handover(self, rebuild: handover.Handover) -> None:
        """Before `take_over`: read the stream's last event per key (`rebuild.pages`) into a private TEMP table.

        Takes no lock on the outbox (the relay goes on), however long the stream."""
        with guarded(self.path):
            handover.stage(self.db, rebuild)

    def take_over(
        self, stream: str, seq: int, positions: dict[str, str], sources: Iterable[str],
        rebuild: handover.Handover | None = None,
    ) -> int:
        """This outbox took `stream` over from another (its lease, see straw/lease.py); the checkpoint is at `seq`.

        Our unpublished records of it are from an earlier lease of ours and were fenced by
        the other holder's claim: dropped (the checkpoint's positions re-read their changes).
        Our `seq` continues above `seq`, and `sources` continue from the checkpoint's positions
        (from the start where it has none). `rebuild` (staged by `stage_handover`): the keyed state
        of its keyed sources and key sweeps, from the stream, written in short transactions first
        (see outbox/handover.py); keyed sources start a new listing (one resumed half-way would
        sweep the keys of the half we did not list).
        Returns the number of records dropped.
        """
        db = self.db
        if rebuild is not None:
            written = handover.steps(db, rebuild)
            while True:  # short transactions: the relay goes on in between (`owe_take_over` covers a crash)
                with self._transaction():
                    if next(written, _DONE) is _DONE:
                        break
            positions = {s: p for s, p in positions.items() if s not in rebuild.keyed}
        with self._transaction():
            db.execute("DELETE FROM meta WHERE key = ?", (f"take_over:{stream}",))
            # Retained published records go too (a repair from them would publish over the new holder),
            # but only the unpublished ones count as dropped.
            dropped = self._waiting(stream, self.published_seq(stream))
            db.execute("DELETE FROM records WHERE stream = ?", (stream,))
            current = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'records'").fetchone()
            if current is None:
                db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('records', ?)", (seq,))
            elif current[0] < seq:
                db.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'records'", (seq,))
            db.execute(
                "INSERT INTO streams (stream, published_seq) VALUES (?, ?) "
                "ON CONFLICT (stream) DO UPDATE SET published_seq = excluded.published_seq",
                (stream, seq),
            )
            for source in sources:
                db.execute(
                    "INSERT INTO positions (source, position) VALUES (?, ?) "
                    "ON CONFLICT (source) DO UPDATE SET position = excluded.position",
                    (source, positions.get(source)),
                )
                # Kept with a position of an earlier lease of ours: the holder since then may have delivered
                # what it names (the id gaps it watched).
                db.execute("DELETE FROM memos WHERE source = ?", (source,))
        return dropped

    def drop_unpublished(self, stream: str, upto: int) -> int:
        """Drop records of `stream` at or below `upto` that were never published (fenced; see `take_over`).

        Published records kept for a rollback repair (`outbox.retain`) stay: they are on the bus."""
        with self._transaction():
            published = self.published_seq(stream)
            if upto <= published:
                return 0
            self._split(stream, published)
            self._split(stream, upto)
            dropped = self._waiting(stream, published) - self._waiting(stream, upto)
            self.db.execute("DELETE FROM records WHERE stream = ? AND seq <= ? AND seq > ?", (stream, upto, published))
            return dropped

    def _waiting(self, stream: str, after: int) -> int:
        """How many records of `stream` are above seq `after`."""
        return int(self.db.execute(
            f"SELECT coalesce(sum({waiting_sum('n', 'seq', '?1')}), 0) FROM records WHERE stream = ?2 AND seq > ?1",
            (after, stream),
        ).fetchone()[0])

    def published_seq(self, stream: str) -> int:
        row = self.db.execute("SELECT published_seq FROM streams WHERE stream = ?", (stream,)).fetchone()
        return int(row[0]) if row else 0

    def pending(self, stream: str, after: int, limit: int) -> list[Pending]:
        """The next records to publish, in order (from `after`: below the published seq when repairing)."""
        out: list[Pending] = []
        # Each row holds one record at least: `limit` rows are enough.
        for row in self.db.execute(
            f"SELECT {_ROW} FROM records WHERE seq > ? AND stream = ? ORDER BY seq LIMIT ?", (after, stream, limit)
        ):
            if row[4] is None:  # a run of one (the WHERE keeps it above `after`)
                out.append(Pending(row[0], row[2], row[3], row[5]))
            else:
                out.extend(unpack(*row, after=after))
            if len(out) >= limit:
                break
        del out[limit:]  # a run cut at `limit`: the next call starts inside it
        return out

    def mark_published(
        self, stream: str, upto: int, counts: dict[str, int] | None = None, size: int | None = None
    ) -> int:
        """Everything of `stream` up to `upto` is on the bus: count it per source; it stays, retained.

        `counts` (records per source) and `size` (bytes of events), when the caller knows them,
        save reading the records here.
        """
        db = self.db
        with self._transaction():
            after = self.published_seq(stream)
            if upto <= after:
                return 0
            if counts is None or size is None:
                counts, size = self._count(stream, after, upto)
            for source, count in counts.items():
                db.execute(
                    "UPDATE positions SET rows_published = rows_published + ? WHERE source = ?", (count, source)
                )
            db.execute(
                "INSERT OR REPLACE INTO published_marks (seq, stream, at, records, bytes) VALUES (?, ?, ?, ?, ?)",
                (upto, stream, time.time(), sum(counts.values()), size),
            )
            db.execute(
                "UPDATE streams SET published_seq = ?, published_at = ?, error = NULL, error_at = NULL "
                "WHERE stream = ?",
                (upto, _now(), stream),
            )
        return sum(counts.values())

    def _count(self, stream: str, after: int, upto: int) -> tuple[dict[str, int], int]:
        """Records per source and bytes of events of `stream` in seq `after` < seq <= `upto`.

        Whole rows are counted by SQL (length() reads no blob); a run that the range cuts is read."""
        counts: dict[str, int] = {}
        size = 0
        for source, count, nbytes in self.db.execute(
            "SELECT source, sum(n), sum(length(event)) FROM records "
            "WHERE stream = ? AND seq - n >= ? AND seq <= ? GROUP BY source",
            (stream, after, upto),
        ):
            counts[source] = counts.get(source, 0) + count
            size += nbytes
        for row in self.db.execute(
            f"SELECT {_ROW} FROM records WHERE stream = ? AND seq > ? AND seq - n < ? AND (seq - n < ? OR seq > ?)",
            (stream, after, upto, after, upto),
        ).fetchall():
            for record in unpack(*row, after=after):
                if record.seq <= upto:
                    counts[record.source] = counts.get(record.source, 0) + 1
                    size += len(record.event)
        return counts, size

    # --- retention and rollbacks ---------------------------------------------

    def prune(self, keep: Keep, holds: dict[str, int], *, now: float | None = None, limit: int = 20_000) -> int:
        """Delete published records beyond what `keep` retains, at most about `limit` per stream per call.

        `holds`: per stream, the seq its bus checkpoint holds now; nothing above it is pruned (a
        rollback under way is repaired from those), and a stream not in `holds` is left alone.
        Cheap when there is nothing to do: it reads only `published_marks` (one row per publish).
        The cut is a whole publish (a batch is retained or pruned as one), and a whole row: a row the
        cut would split stays, with what is below the cut.
        """
        now = time.time() if now is None else now
        deleted = 0
        for stream, hold in holds.items():
            cut = self.db.execute(
                "SELECT max(seq) FROM (SELECT seq, at, sum(records) OVER newer AS n, sum(bytes) OVER newer AS b "
                "FROM published_marks WHERE stream = ? WINDOW newer AS (ORDER BY seq DESC)) "
                "WHERE at < ? OR n > ? OR b > ?",
                (stream, now - keep.age, keep.records, keep.size),
            ).fetchone()[0]
            if cut is None:
                continue
            with self._transaction():
                pruned = self.pruned_seq(stream)
                upto = min(cut, hold, self.published_seq(stream))
                straddling = self.db.execute(
                    "SELECT seq - n FROM records WHERE stream = ? AND seq > ? ORDER BY seq LIMIT 1", (stream, upto)
                ).fetchone()
                if straddling is not None and straddling[0] < upto:
                    upto = max(pruned, straddling[0])
                first = self.db.execute(
                    "SELECT first FROM (SELECT seq - n AS first, sum(n) OVER (ORDER BY seq) - n AS before "
                    "FROM records WHERE stream = ? AND seq > ? AND seq <= ?) WHERE before >= ? ORDER BY first LIMIT 1",
                    (stream, pruned, upto, limit),
                ).fetchone()
                if first is not None:  # more than `limit` to go: this call takes the oldest rows, `limit` at least
                    upto = first[0]
                deleted += self._waiting(stream, pruned) - self._waiting(stream, upto)
                self.db.execute("DELETE FROM records WHERE stream = ? AND seq > ? AND seq <= ?", (stream, pruned, upto))
                self.db.execute("DELETE FROM published_marks WHERE stream = ? AND seq <= ?", (stream, upto))
                self.db.execute("UPDATE retention SET pruned_seq = max(pruned_seq, ?) WHERE stream = ?", (upto, stream))
        return deleted

    def pruned_seq(self, stream: str) -> int:
        """Nothing of `stream` at or below this seq is held: a rollback below it cannot be repaired from here."""
        row = self.db.execute("SELECT pruned_seq FROM retention WHERE stream = ?", (stream,)).fetchone()
        return int(row[0]) if row else self.published_seq(stream)

    def retained(self, stream: str) -> Retained:
        published = self.published_seq(stream)
        count, first, last = self.db.execute(
            "SELECT coalesce(sum(n), 0), min(seq - n + 1), max(seq) FROM records WHERE stream = ? AND seq <= ?",
            (stream, published),
        ).fetchone()
        # A run published in part (its rest waits): its published head is retained too.
        straddling = self.db.execute(
            "SELECT seq - n FROM records WHERE stream = ? AND seq > ? ORDER BY seq LIMIT 1", (stream, published)
        ).fetchone()
        if straddling is not None and straddling[0] < published:
            count += published - straddling[0]
            first = straddling[0] + 1 if first is None else first
            last = published
        return Retained(int(count), first, last)

    def rollback_seen(self, stream: str, bus_seq: int, outbox_seq: int, missing: tuple[int, int] | None) -> bool:
        """Note a rollback of the bus (once per event: a repair resumed after a restart is the same one).

        Returns whether it is new."""
        with self._transaction():
            row = self.db.execute(
                "SELECT id, outbox_seq FROM rollbacks WHERE stream = ? AND repaired_at IS NULL "
                "ORDER BY id DESC LIMIT 1",
                (stream,),
            ).fetchone()
            if row is not None and row[1] == outbox_seq:
                if missing is not None:
                    self.db.execute(
                        "UPDATE rollbacks SET missing_from = ?, missing_to = ? WHERE id = ?", (*missing, row[0])
                    )
                return False
            self.db.execute(
                "INSERT INTO rollbacks (stream, bus_seq, outbox_seq, detected_at, missing_from, missing_to) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (stream, bus_seq, outbox_seq, _now(), *(missing or (None, None))),
            )
            return True

    def rollback_repaired(self, stream: str) -> Rollback | None:
        """The stream's open rollback is repaired (the bus is back at the published seq): close it."""
        with self._transaction():
            self.db.execute(
                "UPDATE rollbacks SET repaired_at = ? WHERE stream = ? AND repaired_at IS NULL", (_now(), stream)
            )
        return self.rollback(stream)

    def rollback(self, stream: str) -> Rollback | None:
        """The latest rollback noticed on `stream`, if any."""
        row = self.db.execute(
            "SELECT stream, bus_seq, outbox_seq, detected_at, repaired_at, missing_from, missing_to FROM rollbacks "
            "WHERE stream = ? ORDER BY id DESC LIMIT 1",
            (stream,),
        ).fetchone()
        if row is None:
            return None
        missing = (row[5], row[6]) if row[5] is not None else None
        return Rollback(row[0], row[1], row[2], row[3], row[4], missing)

    def replay(self, stream: str, seq: int, positions: dict[str, str | None]) -> tuple[int, list[str]]:
        """Give up the records of `stream` above the bus's checkpoint `seq`, to read them again from the sources.

        Each source in `positions` restarts at its position there (None: from the start), except keyed
        sources (snapshots, listings): they forget what they delivered and start a listing, which then
        sends every row again. Returns how many records were dropped, and the keyed sources.
        """
        db = self.db
        with self._transaction():
            self._split(stream, seq)
            dropped = self._waiting(stream, seq)
            db.execute("DELETE FROM records WHERE stream = ? AND seq > ?", (stream, seq))
            db.execute("DELETE FROM published_marks WHERE stream = ? AND seq > ?", (stream, seq))
            db.execute(
                "UPDATE streams SET published_seq = ?, error = NULL, error_at = NULL WHERE stream = ?", (seq, stream)
            )
            db.execute("INSERT OR REPLACE INTO retention (stream, pruned_seq) VALUES (?, ?)", (stream, seq))
            db.execute(
                "UPDATE rollbacks SET repaired_at = ? WHERE stream = ? AND repaired_at IS NULL", (_now(), stream)
            )
            listed = [source for source in positions if keyed.known(db, source)]
            for source, position in positions.items():
                db.execute(
                    "INSERT INTO positions (source, position) VALUES (?, ?) "
                    "ON CONFLICT (source) DO UPDATE SET position = excluded.position, error = NULL, error_at = NULL",
                    (source, None if source in listed else position),
                )
            for source in listed:
                keyed.forget(db, source)
        return int(dropped), listed

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
            backlog = self._waiting(stream, seq)
            out.append(
                StreamState(stream, seq, at, backlog, error, error_at, self.retained(stream), self.rollback(stream))
            )
        return out

    def backlog(self) -> int:
        """Records not yet published, over all streams (retained ones are not counted)."""
        return int(self.db.execute(backlog_query()).fetchone()[0])

    def size(self) -> int:
        """Bytes the outbox file takes (its WAL apart)."""
        pages, page = (self.db.execute(f"PRAGMA {name}").fetchone()[0] for name in ("page_count", "page_size"))
        return int(pages) * int(page)

    def oldest_pending_time(self, stream: str, after: int) -> str | None:
        """The `time` (when observed) of the stream's oldest record not yet published, or None."""
        row = self.db.execute(
            f"SELECT {_ROW} FROM records WHERE stream = ? AND seq > ? ORDER BY seq LIMIT 1", (stream, after)
        ).fetchone()
        if row is None:
            return None
        if row[4] is None:  # one record: SQLite reads its time without a copy of the event
            found = self.db.execute("SELECT json_extract(CAST(event AS TEXT), '$.time') FROM records WHERE seq = ?",
                                    (row[0],)).fetchone()[0]
            return None if found is None else str(found)
        # A run, maybe published in part (`oldest_pending_query` takes its first record: the metrics' estimate).
        first = unpack(*row, after=after)[0].event
        time_ = orjson.loads(first).get("time") if first.startswith(b"{") else None
        return time_ if isinstance(time_, str) else None

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
        self, letter_id: int, source: str, stream: str, event: tuple[str, bytes] | None, *, relist: str | None = None
    ) -> int | None:
        """Delete a dead letter and queue what its row maps to now, in one transaction; the source's position
        does not move. Returns how many records were queued, or None if the letter was gone already.

        `event`: (position, bytes) of an incremental source's record. It carries the source's stored position,
        not the old row's (its event id keeps that one): the checkpoint takes each source's position from its
        last record, and it must stay the watermark, else a replacement outbox would start there and publish
        every row after it again.
        `relist`: a keyed source's key, whose row its next listing maps again (its stored row digest is
        forgotten) and sends if its data differs from what was delivered: the row as it is then, never the
        dead letter's older version, and never twice.
        """
        with self._transaction():
            if self.db.execute("DELETE FROM dead_letters WHERE id = ?", (letter_id,)).rowcount == 0:
                return None
            if relist is not None:
                keyed.relist(self.db, source, relist)
            if event is None:
                return 0
            self._insert(source, stream, [(self.position(source) or event[0], event[1])])
        return 1

    def is_keyed(self, source: str) -> bool:
        """Whether `source` has delivered keyed batches (a snapshot or a scraped listing)."""
        return keyed.known(self.db, source)

    def dead_letter_counts(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT source, count(*) FROM dead_letters GROUP BY source").fetchall())
