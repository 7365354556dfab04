"""Commit-safe watermarks: how far a poll may take rows without passing one a still-open transaction may commit.

A watermark that passes a value an open transaction later commits below loses that row for good.
Each technique returns, per poll, a `Bound` on the first change column (the timestamp, or the id):

- `ledger` (PostgreSQL, MariaDB/MySQL InnoDB): at every poll straw notes the highest visible value
  together with the transactions open at that moment. A transaction that will commit a value at or
  below it already holds that value, so it is open now; once every one of them has ended, nothing can
  commit at or below it any more and the watermark may pass it. With nothing open, everything visible
  is final at once (an idle database costs no latency). PostgreSQL: the running xids of
  `pg_current_snapshot()` (64-bit, never reused: no wraparound) and the database's sessions inside a
  transaction (a sequence value is taken before the xid), read in the same statement, hence the
  same snapshot, as the highest value; timestamp mode also stops below the start of the oldest open
  transaction, since `DEFAULT now()` is the transaction's start even before it has written (and so
  has no xid). MariaDB/MySQL: the open InnoDB transactions of `information_schema.innodb_trx`
  (the PROCESS privilege), read after the highest value.
- `window` (any other database, and the fallbacks): timestamp mode takes rows older than the
  database's now minus the window; incrementing mode takes ids in order and never passes a gap in
  them younger than the window (a late commit fills it), giving a gap up, with a log line, once it is
  older: rolled-back transactions leave gaps that never fill.
- `off` (SQLite, one writer at a time; or `settle: off`): rows are taken as soon as they are visible.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field, replace
from decimal import Decimal
from functools import partial
from typing import Any, Protocol

import orjson
import structlog
from sqlalchemy import ColumnElement, literal_column, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from adapters.db.direct import Direct
from straw.source import RawBatch

log = structlog.get_logger("straw.settle")

DEFAULT_WINDOW = 30.0  # seconds: where no database technique applies
# seconds: InnoDB's TRX_I_S_CACHE_MIN_REFRESH_TIME (100 ms), and a margin for a statement that has taken
# its NOW() but is not yet registered as a transaction
INNODB_TRX_CACHE = 0.2
SHORT_WAIT = 1.0  # seconds a poll re-looks for open transactions to end before leaving rows to the next poll
# Seconds between those looks: the first soon (a writer's transaction of one INSERT ends within milliseconds; a
# fixed 50 ms made a held poll's rows wait 50-100 ms for a commit long done), then doubling to the last, so a
# long transaction costs about as many looks a second as before (21 against 20).
RELOOK_FIRST, RELOOK_MOST = 0.005, 0.05
_ER_SPECIFIC_ACCESS_DENIED = 1227  # MySQL/MariaDB: "you need the PROCESS privilege"


@dataclass(frozen=True)
class Bound:
    """What one poll may take. `hold`: nothing beyond the watermark; `cap`: only rows with value <= cap."""

    cap: Any = None
    hold: bool = False
    gaps: GapWatch | None = None


OPEN = Bound()
HOLD = Bound(hold=True)


class Probe(Protocol):
    """What a technique asks of the source, in the source's own terms."""

    def top_query(self) -> Any: ...  # SELECT max(first change column) over the relation (a SQLAlchemy select)

    # EXISTS (a row after the watermark, by the read's own predicate); None: no watermark, every row is after it.
    # Both are the same objects from poll to poll while the relation stays: a technique may keep what it builds.
    def beyond_query(self) -> Any: ...

    def params(self) -> dict[str, Any]: ...  # the parameters of both

    def column_time(self, conn: Connection, utc: dt.datetime) -> dt.datetime: ...  # as the column compares

    def db_now(self, conn: Connection) -> dt.datetime: ...  # the database's clock, aware UTC



class Technique(Protocol):
    name: str
    why: str

    def bound(self, conn: Connection, probe: Probe) -> Bound: ...


class Off:
    def __init__(self, why: str) -> None:
        self.name, self.why = "off", why

    def bound(self, conn: Connection, probe: Probe) -> Bound:
        return OPEN


class Window:
    """A settle window on the database's clock; incrementing mode watches id gaps for as long."""

    def __init__(self, seconds: float, *, timestamp: bool, source: str, why: str) -> None:
        self.seconds, self.timestamp, self.why = seconds, timestamp, why
        self.name = f"window {seconds:g}s"
        self.gaps = None if timestamp else GapWatch(seconds, source)

    def bound(self, conn: Connection, probe: Probe) -> Bound:
        if self.gaps is not None:
            return Bound(gaps=self.gaps)
        now = probe.db_now(conn)
        return Bound(cap=probe.column_time(conn, now - dt.timedelta(seconds=self.seconds)))


LATE_WATCH_MIN = 300.0  # seconds a given-up gap is looked at again, at least (else 10 windows)
LATE_WATCH_RANGES = 1000  # given-up gaps watched at most, the newest


@dataclass
class GapWatch:
    """Ids missing between the watermark and the rows read, with when straw first saw each gap.

    A gap given up (passed, older than the window) is watched a while longer: a transaction that outlasted
    the window commits its ids behind the watermark, where no read looks. `due` names the gaps to look at
    again (at most once a window), `delivered` takes the ids found there out of the watch.

    The watch outlives a restart: `memo` is what to commit with the position that passes a gap (the
    runner writes it in the same outbox transaction, see `RawBatch.memo`), `restore` reads it back. Kept
    only in memory, a restart within the watch would lose what commits into its gaps afterwards.
    """

    window: float
    source: str
    first_seen: dict[int, float] = field(default_factory=dict)
    given_up: int = 0  # gaps older than the window, passed (a metric: rolled back or skipped ids)
    late: dict[tuple[int, int], float] = field(default_factory=dict)  # given-up (first, last) id -> when
    looked_at: float = 0.0
    found_late: int = 0  # ids committed into a given-up gap, delivered late (a metric)
    changes: int = 0  # bumped when a gap is given up or ids leave the watch
    kept: int = 0  # `changes` as last committed with a position (the memo is written only when it differs)

    @property
    def watched_s(self) -> float:
        """How long a given-up gap is watched."""
        return max(10 * self.window, LATE_WATCH_MIN)

    def due(self, watermark: int) -> list[tuple[int, int]]:
        """The given-up gaps, at or below `watermark`, to look at now; none while looked at within a window."""
        now = time.monotonic()
        horizon = self.watched_s
        self.late = {gap: at for gap, at in self.late.items() if now - at < horizon}
        if not self.late or now - self.looked_at < self.window:
            return []
        self.looked_at = now
        return [(first, min(last, watermark)) for first, last in sorted(self.late) if first <= watermark]

    def delivered(self, ids: list[int]) -> None:
        """Ids found in given-up gaps and committed to the outbox: not looked for again."""
        self.found_late += len(ids)
        self.late = _without(self.late, ids)
        self.changes += 1

    def memo(self, delivering: list[int] | None = None) -> str | None:
        """The watch as JSON text, to commit with the position, when it changed since last committed.

        `delivering`: ids of the batch it goes with, out of the watch once that commits (`delivered`).
        Times are wall-clock seconds: a monotonic clock starts over with the host.
        """
        if self.changes == self.kept and delivering is None:
            return None
        late = self.late if delivering is None else _without(self.late, delivering)
        found = self.found_late + (len(delivering) if delivering else 0)
        wall = time.time() - time.monotonic()
        return orjson.dumps({
            "late": [[first, last, round(at + wall, 3)] for (first, last), at in sorted(late.items())],
            "given_up": self.given_up, "found_late": found, "watched_s": self.watched_s,
        }).decode()

    def committed(self, changes: int) -> None:
        """The memo taken at `changes` is in the outbox with its position."""
        self.kept = max(self.kept, changes)

    def carry(self, batch: RawBatch, delivering: list[int] | None = None) -> RawBatch:
        """`batch` with the watch to commit with its position, if it changed since last committed.

        `delivering`: the ids of a batch of late rows, out of the watch once it commits (in memory and in
        the memo committed with them: a poll stopped right after, or a restart, must not send them again).
        """
        memo = self.memo(delivering)
        if memo is None:
            return batch
        return replace(batch, memo=memo, on_commit=partial(self._committed, self.changes, delivering))

    def _committed(self, changes: int, delivering: list[int] | None) -> None:
        if delivering is not None:
            self.delivered(delivering)
            changes = self.changes  # the memo went without them already
        self.committed(changes)

    def restore(self, memo: str | None) -> None:
        """The watch as last committed (`memo`; None: none): its gaps watched again for what is left of their
        watch. What was watched in memory goes (a lease takeover replaced the position it went with)."""
        self.late, self.first_seen, self.looked_at = {}, {}, 0.0
        self.kept = self.changes
        if memo is None:
            return
        try:
            kept = Kept.parse(memo)
        except UnreadableMemo as exc:
            # Only straw writes it; unreadable, it costs the watch, never the read.
            log.warning("settle: the stored gap watch is unreadable; gaps given up before are no longer watched",
                        source=self.source, error=str(exc))
            return
        now, to_monotonic = time.time(), time.monotonic() - time.time()
        horizon = self.watched_s
        self.late = {gap: at + to_monotonic for gap, at in kept.late.items() if now - at < horizon}
        self.given_up, self.found_late = kept.given_up, kept.found_late

    def admit(self, expected: int | None, values: list[Any]) -> tuple[int, int | None]:
        """How many of `values` (ascending ids) may be taken, and the id expected after them.

        `expected`: the id right after the watermark (None: unknown, e.g. before the first row).
        """
        now = time.monotonic()
        for i, raw in enumerate(values):
            value = _integral(raw)
            if value is None:
                return len(values), None  # not an integer id: no gaps to see
            if expected is not None and value > expected:
                seen = self.first_seen.setdefault(expected, now)
                if now - seen < self.window:
                    return i, expected  # a late commit may still fill it: stop before it
                del self.first_seen[expected]
                self.given_up += 1
                self.changes += 1
                self.late[(expected, value - 1)] = now
                if len(self.late) > LATE_WATCH_RANGES:
                    del self.late[min(self.late, key=self.late.__getitem__)]
                log.warning(
                    "settle: gap in ids given up (a rolled-back transaction or a skipped sequence value)",
                    source=self.source, missing=f"{expected}..{value - 1}", waited_s=round(now - seen, 1),
                    watched_s=round(self.watched_s),  # for a commit that comes later still
                )
            elif expected is not None and value == expected:
                self.first_seen.pop(expected, None)
            expected = value + 1
        return len(values), expected


class UnreadableMemo(Exception):
    """A stored gap watch that is not one (straw wrote it; another version, or a damaged file)."""


@dataclass(frozen=True)
class Kept:
    """A gap watch as committed with its source's position (`GapWatch.memo`): given-up gaps with the
    wall-clock time each was given up, the counts, and how long a gap is watched."""

    late: dict[tuple[int, int], float]
    given_up: int
    found_late: int
    watched_s: float

    @staticmethod
    def parse(memo: str) -> Kept:
        try:
            data = orjson.loads(memo)
            late = {(int(first), int(last)): float(at) for first, last, at in data["late"]}
            return Kept(late, int(data["given_up"]), int(data["found_late"]), float(data["watched_s"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise UnreadableMemo(f"{type(exc).__name__}: {exc}") from None

    def watched(self, now: float) -> int:
        """How many of its gaps are still watched at wall-clock time `now`."""
        return sum(1 for at in self.late.values() if now - at < self.watched_s)


def _without(late: dict[tuple[int, int], float], ids: list[int]) -> dict[tuple[int, int], float]:
    """The watched gaps with `ids` taken out (a gap with one inside splits around it)."""
    late = dict(late)
    for found in ids:
        for (first, last), at in list(late.items()):
            if first <= found <= last:
                del late[(first, last)]
                for part in ((first, found - 1), (found + 1, last)):
                    if part[0] <= part[1]:
                        late[part] = at
                break
    return late


def gap_watch(technique: Technique) -> GapWatch | None:
    """The id gaps a technique watches (a window in incrementing mode, also as a ledger's fallback), if any."""
    window = technique.fallback if isinstance(technique, Ledger) else technique
    return window.gaps if isinstance(window, Window) else None


def _above(a: Any, b: Any) -> bool:
    """Is cap `a` above cap `b`? Caps of one source are of one type; if not, the newer one (`a`) wins."""
    try:
        return bool(a > b)
    except TypeError:
        return True


def _integral(value: Any) -> int | None:
    """An id as an int: NUMBER/DECIMAL ids (Oracle, SQL Server over ODBC) arrive as Decimal."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, Decimal) and value.is_finite() and value == value.to_integral_value():
        return int(value)
    return None


class Ledger:
    """The highest visible value and the transactions open when it was seen; passed once they have ended."""

    def __init__(self, dialect: str, *, timestamp: bool, source: str, fallback: float) -> None:
        self.dialect, self.timestamp, self.source, self.window = dialect, timestamp, source, fallback
        self.entries: list[tuple[Any, frozenset[object]]] = []
        self.looks = 0
        self.fallback: Window | None = None
        # The probe statement, built for the probe's (top, beyond) queries: rebuilt only when they change.
        self._probe: tuple[Any, Any, tuple[Any, ...], Direct] | None = None
        if dialect == "postgresql":
            self.name = "pg transaction horizon"
            self.why = ("PostgreSQL: the highest visible value waits for the transactions open when it was read "
                        "(running xids of pg_current_snapshot(), 64-bit, and this database's sessions in a "
                        "transaction)" + ("; and stays below the oldest one's start" if timestamp else ""))
        else:
            self.name = "innodb open transactions"
            self.why = ("InnoDB: the highest visible value waits for the write transactions open when it was read "
                        "(information_schema.innodb_trx)")

    def bound(self, conn: Connection, probe: Probe) -> Bound:
        # Most writes commit within milliseconds: re-look briefly before deferring what is held to the next poll.
        deadline = time.monotonic() + SHORT_WAIT
        self.looks = 0
        pause = RELOOK_FIRST
        best: Bound | None = None
        while True:
            bound, held = self._bound(conn, probe)
            self.looks += 1
            if bound.cap is not None:
                best = bound if best is None or _above(bound.cap, best.cap) else best
            if not held or time.monotonic() >= deadline:
                # A cap one look passed stays passed: the ledger has let go of what it covered, so a later
                # look that holds everything again must not drop it (behind a writer that always has a
                # transaction open, every last look holds, and nothing would ever be delivered).
                return best if best is not None else bound
            time.sleep(pause)
            pause = min(pause * 2, RELOOK_MOST)

    def _bound(self, conn: Connection, probe: Probe) -> tuple[Bound, bool]:
        """The bound, and whether open transactions hold back part of what is visible."""
        if self.fallback is not None:
            return self.fallback.bound(conn, probe), False
        if self.dialect == "postgresql":
            top, beyond, open_now, oldest = self._postgres(conn, probe)
            if not beyond:
                # Nothing after the watermark, by the read's own predicate in the same snapshot: the read would
                # find nothing, so it is not sent (one statement per idle poll). A row committed since is after
                # the same watermark at the next poll, which has not moved: skipping can delay, never lose.
                return HOLD, False
        else:
            # InnoDB keeps a read view for the whole transaction (REPEATABLE READ): each read gets its own,
            # so the rows are read after who was open, and a writer committing in between is among them.
            conn.rollback()
            top, beyond = self._statement(probe, ()).one(conn, probe.params())
            if not beyond:
                # Nothing after the watermark to hold or pass: an idle poll skips the wait for the cache below
                # (300 idle sources on one database would otherwise hold its connections a minute a round).
                conn.rollback()
                return HOLD, False
            # information_schema.innodb_trx is served from a cache refreshed at most every 0.1 s: read it
            # later than that (and a margin), or a writer that started just before the highest value was
            # read is missed.
            time.sleep(INNODB_TRX_CACHE)
            found = self._innodb(conn)
            conn.rollback()
            if found is None:
                assert self.fallback is not None
                return self.fallback.bound(conn, probe), False
            open_now, oldest = found, None
        if top is None:
            return HOLD, False  # nothing to take; a row committed from now on is judged at the next poll
        cap = self._settle(top, open_now)
        if cap is None:
            return HOLD, True
        if oldest is not None:
            # DEFAULT now() is the start of its transaction: nothing below that start may be passed yet.
            start = probe.column_time(conn, oldest.astimezone(dt.UTC)) - dt.timedelta(microseconds=1)
            if start < cap:
                return Bound(cap=start), True
        return Bound(cap=cap), cap < top

    def _settle(self, top: Any, open_now: frozenset[object]) -> Any:
        if not open_now:
            self.entries.clear()
            return top
        settled = [value for value, held in self.entries if not held & open_now]
        cap = max(settled) if settled else None
        self.entries = [(v, held) for v, held in self.entries if cap is None or v > cap]
        if not self.entries or top > self.entries[-1][0]:
            # A value already noted keeps its older, smaller set: it settles sooner.
            self.entries.append((top, open_now))
        return cap

    def _statement(self, probe: Probe, more: tuple[Any, ...]) -> Direct:
        """SELECT the highest value, whether any row is after the watermark, and `more` columns: built once
        per (top, beyond) queries of the probe, so an idle poll builds no expression."""
        top, beyond = probe.top_query(), probe.beyond_query()
        kept = self._probe
        if kept is None or kept[0] is not top or kept[1] is not beyond or kept[2] is not more:
            # Without a watermark every row is after it: whether there is one at all is whether `top` is.
            after = beyond if beyond is not None else top.scalar_subquery().is_not(None)
            kept = self._probe = (top, beyond, more, Direct(select(top.scalar_subquery(), after, *more)))
        return kept[3]

    def _postgres(
        self, conn: Connection, probe: Probe
    ) -> tuple[Any, bool, frozenset[object], dt.datetime | None]:
        """The highest value, whether any row is after the watermark, the transactions open when the
        highest value was read, and the oldest one's start.

        Open means either a running xid of the snapshot (64-bit, never reused: no wraparound to mind)
        or a session of this database inside a transaction: a sequence value or a `now()` is taken
        before the transaction has an xid, so xids alone would miss a writer for that instant.
        """
        if self.looks:
            conn.execute(text("SELECT pg_stat_clear_snapshot()"))  # activity is cached per transaction
        snapshot = _PG_SNAPSHOT if (conn.dialect.server_version_info or (13,)) >= (13,) else _PG_SNAPSHOT_12
        # One statement, one snapshot: the highest value is read first, then who is running.
        value, beyond, snap, listed = self._statement(probe, snapshot).one(conn, probe.params())
        if not beyond:
            return value, False, frozenset(), None
        found: set[object] = set()
        elsewhere: set[int] = set()  # xids are cluster-wide; a session writes only in its own database
        starts: list[Decimal] = []
        for item in str(listed or "").split(","):
            if item.startswith("x"):
                elsewhere.add(int(item[1:]))
            elif item.startswith("s"):
                found.add(item)
                starts.append(Decimal(item.split("@")[1]))
        xip = str(snap).split(":")[2]
        found.update(int(x) for x in xip.split(",") if x and int(x) % 2**32 not in elsewhere)
        oldest = None
        if self.timestamp and starts:
            first = min(starts)
            whole = int(first)
            micros = int((first - whole) * 1_000_000)
            oldest = dt.datetime.fromtimestamp(whole, dt.UTC) + dt.timedelta(microseconds=micros)
        return value, True, frozenset(found), oldest

    def _innodb(self, conn: Connection) -> frozenset[object] | None:
        try:
            rows = conn.execute(text(
                # Every transaction counts, idle ones too: filtering on trx_rows_modified or trx_query
                # lost rows under the stress test (tests/test_db_commit_safe.py).
                "SELECT trx_id FROM information_schema.innodb_trx "
                "WHERE trx_mysql_thread_id <> CONNECTION_ID() AND trx_is_read_only = 0"
            )).scalars().all()
        except DBAPIError as exc:
            code = exc.orig.args[0] if exc.orig is not None and exc.orig.args else None
            if code != _ER_SPECIFIC_ACCESS_DENIED and "PROCESS" not in str(exc.orig):
                raise
            why = NO_PROCESS.format(window=self.window)
            self.fallback = Window(self.window, timestamp=self.timestamp, source=self.source, why=why)
            self.name, self.why = self.fallback.name, why
            log.warning("settle: falling back to a settle window", source=self.source, reason=why)
            return None
        return frozenset(int(r) for r in rows)  # trx ids grow and are never reused


_PG_SESSIONS: ColumnElement[Any] = literal_column(
    "(SELECT string_agg(CASE WHEN datname = current_database() "
    "THEN 's' || pid || '@' || extract(epoch FROM xact_start) ELSE 'x' || backend_xid END, ',') "
    "FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND backend_type = 'client backend' "
    "AND xact_start IS NOT NULL AND (datname = current_database() OR backend_xid IS NOT NULL))"
)
# The running transactions (pg_current_snapshot() from PostgreSQL 13 on), then the sessions in a transaction.
_PG_SNAPSHOT: tuple[ColumnElement[Any], ...] = (literal_column("pg_current_snapshot()::text"), _PG_SESSIONS)
_PG_SNAPSHOT_12: tuple[ColumnElement[Any], ...] = (literal_column("txid_current_snapshot()::text"), _PG_SESSIONS)

NO_PROCESS = ("no PROCESS privilege to read information_schema.innodb_trx: a {window:g}s settle window "
              "instead (GRANT PROCESS ON *.* TO the straw user for the exact technique)")


def choose(
    dialect: str, *, settle: str, delay: float, timestamp: bool, source: str, fallback: float = DEFAULT_WINDOW
) -> Technique:
    """The technique for a source: `settle: off`, a fixed `settle_delay`, or auto by dialect."""
    if settle == "off":
        return Off("settle: off (the configuration says one writer)")
    if delay:
        return Window(delay, timestamp=timestamp, source=source, why="settle_delay set in the configuration")
    if dialect == "sqlite":
        return Off("SQLite: one writer at a time, commits in order; nothing to settle")
    if dialect in ("postgresql", "mysql", "mariadb"):
        return Ledger(dialect, timestamp=timestamp, source=source, fallback=fallback)
    why = f"{dialect}: no transaction horizon straw can read; the `settle_fallback` window"
    return Window(fallback, timestamp=timestamp, source=source, why=why)

