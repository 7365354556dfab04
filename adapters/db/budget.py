"""A connection budget per legacy database: one shared pool, a fair queue in front of it.

Every source whose `url` names the same database borrows its connections from one
engine. At most `connections` are ever open on that database (the pool holds one
between polls, more only while polls overlap, and closes a surplus one as soon as it
is returned); a poll waits its turn in a first-come first-served queue, so a due
source is never starved by the others. The one connection kept between polls is
closed after `idle_timeout` without use (`trim`), or at once with `idle_connections: 0`.

The connection kept between polls rests checked out, in the `Database` rather than in the
pool: hundreds of idle polls a second would otherwise spend a fifth of their CPU on the
pool's checkout and return (events, a Connection object, the reset). It is still one of the
pool's connections, so the pool's own limit (`connections`) bounds everything open.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from sqlalchemy.engine import Connection, Engine

import adapters.db.engine as engines
from adapters.db.direct import Batch, Direct
from adapters.db.engine import make_engine, session
from straw.config import DatabaseSpec


class Gate:
    """A counting semaphore that serves waiters in arrival order (threading.Semaphore does not promise it)."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._free = slots
        self._lock = threading.Lock()
        self._waiters: deque[threading.Lock] = deque()

    def acquire(self) -> None:
        with self._lock:
            if self._free and not self._waiters:
                self._free -= 1
                return
            waiter = threading.Lock()
            waiter.acquire()
            self._waiters.append(waiter)
        waiter.acquire()  # released by `release`, which hands its slot over directly

    def release(self) -> None:
        with self._lock:
            if self._waiters:
                self._waiters.popleft().release()
            else:
                self._free += 1

    def try_acquire(self) -> bool:
        """Take a slot only if one is free now and nobody waits for it (no waiting); True when taken."""
        with self._lock:
            if self._free and not self._waiters:
                self._free -= 1
                return True
            return False

    def acquire_all(self) -> bool:
        """Take every slot at once if none is in use or awaited (no waiting); True when taken."""
        with self._lock:
            if self._free != self.slots or self._waiters:
                return False
            self._free = 0
            return True

    def release_all(self) -> None:
        for _ in range(self.slots):
            self.release()

    @property
    def waiting(self) -> bool:
        """Whether a poll waits for a slot."""
        with self._lock:
            return bool(self._waiters)

    @property
    def in_use(self) -> int:
        with self._lock:
            return self.slots - self._free


# Idle probes batched: a source due within this long (or 5 % of its interval, if less) is asked along with
# the one polling now; the answer "no row after its watermark" holds for as long. Using it is the same as
# that source having polled this much early: a row committed since is read at its next poll.
BATCH_WINDOW = 0.25
BATCH_SHARE = 0.05
BATCH_MAX = 200  # sources per statement
BATCH_PAUSE = 60.0  # seconds without batching on a database after a batch failed (a member's table gone)


class Batched(Protocol):
    """A source whose idle probe may be asked in a batch (DbSource)."""

    def idle_probe(self, conn: Connection) -> tuple[Any, Direct, dict[str, Any]] | None:
        """Its watermark's identity, the EXISTS of a row after it, and its parameters; None: not batchable now."""

    def due_within(self, now: float) -> float | None:
        """How long an answer taken `now` holds for it, if it is due within that long (None: not due soon)."""

    @property
    def session_key(self) -> Any:
        """What its statements depend on in the connection's session (text encoding, statement timeout):
        batched only with sources alike, since the batch runs in the session of the one polling."""


class Database:
    """One legacy database's engine and budget, shared by the sources on it."""

    def __init__(self, spec: DatabaseSpec, engine: Engine) -> None:
        self.spec = spec
        self.engine = engine
        self.gate = Gate(spec.connections)
        self.users = 0
        self.last_used = time.monotonic()
        self._kept = False  # a connection may be open in the pool between polls
        self._lock = threading.Lock()
        # The connection kept between polls, checked out of the pool, and since when (SQLite keeps its own pool:
        # its connections belong to their thread).
        self._resting: Connection | None = None
        self._rested_at = 0.0
        self._rests = engine.dialect.name != "sqlite"
        self._options = engine.get_execution_options()
        self._psycopg = engine.dialect.driver == "psycopg"
        self._members: dict[Batched, None] = {}  # sources whose idle probes may be batched, in order
        self._answers: dict[Batched, tuple[Any, float, float]] = {}  # no row after (watermark, at, for how long)
        self._batch = Batch()
        self._batch_paused = 0.0

    def join(self, source: Batched) -> None:
        with self._lock:
            self._members[source] = None

    def leave(self, source: Batched) -> None:
        with self._lock:
            self._members.pop(source, None)
            self._answers.pop(source, None)

    def nothing_after(self, source: Batched, conn: Connection) -> bool:
        """Did a batched probe find no row after `source`'s watermark moments ago? If it was not asked, ask
        now, for it and the other sources here due soon, in one statement (on `conn`, in autocommit)."""
        now = time.monotonic()
        own = source.idle_probe(conn)
        if own is None:
            return False
        with self._lock:
            answer = self._answers.pop(source, None)
        if answer is not None and _same(answer[0], own[0]) and now - answer[1] <= answer[2]:
            return True  # the watermark has not moved since it was asked, moments ago
        if now < self._batch_paused:
            return False
        with self._lock:
            others = [m for m in self._members if m is not source and m.session_key == source.session_key]
        members: list[tuple[Batched, tuple[Any, Direct, dict[str, Any]], float]] = [(source, own, 0.0)]
        for other in others:
            window = other.due_within(now)
            probe = other.idle_probe(conn) if window is not None else None
            if window is not None and probe is not None:
                members.append((other, probe, window))
                if len(members) >= BATCH_MAX:
                    break
        if len(members) < 2:
            return False  # alone: its own probe, which also settles what it finds
        found = self._batch.run(conn, [(probe[1], probe[2]) for _member, probe, _window in members])
        if found is None:
            self._batch_paused = now + BATCH_PAUSE
            return False
        with self._lock:
            for (member, probe, window), beyond in zip(members[1:], found[1:], strict=True):
                if not beyond:
                    self._answers[member] = (probe[0], now, window)
        return not found[0]

    @contextmanager
    def connect(
        self, *, statement_timeout: float | None = None, encoding: str = "utf-8", autocommit: bool = False
    ) -> Iterator[Connection]:
        """A connection for one poll, in turn; the source's own session settings applied to it.

        `autocommit` (psycopg): each statement in a transaction of its own, for an idle poll's probe; the
        connection rests so between polls, and one handed out for anything else takes transactions again.
        """
        self.gate.acquire()
        conn: Connection | None = None
        try:
            conn = self._take() or self.engine.connect()
            self._kept = True
            session(conn, statement_timeout, encoding)
            engines.set_autocommit(conn, autocommit)
            yield conn
        except BaseException:
            if conn is not None:
                conn.close()  # back to the pool, which resets it (or drops it, invalidated)
            raise
        else:
            self._rest(conn)
        finally:
            self.last_used = time.monotonic()
            self.gate.release()
        if not self.spec.idle_connections:
            self.close_idle()

    @contextmanager
    def spare(self, *, statement_timeout: float | None = None, encoding: str = "utf-8") -> Iterator[Connection | None]:
        """A second connection for a poll that holds one, if a slot is free right now; else None.

        Never waits: two polls each holding a connection and waiting for a second would wait forever.
        """
        if not self.gate.try_acquire():
            yield None
            return
        try:
            with self.engine.connect() as conn:
                session(conn, statement_timeout, encoding)
                yield conn
                # Closed for real, not pooled: the poll's own connection rests for the next poll, and an idle
                # database holds one connection, not two until `idle_timeout`.
                conn.invalidate()
        finally:
            self.last_used = time.monotonic()
            self.gate.release()

    def _take(self) -> Connection | None:
        """The resting connection, pinged first if it has rested long enough to have died meanwhile."""
        with self._lock:
            conn, self._resting = self._resting, None
        if conn is None:
            return None
        if time.monotonic() - self._rested_at > engines.PING_AFTER:
            try:
                raw = conn.connection.dbapi_connection
                if raw is None or not conn.dialect.do_ping(raw):
                    raise ConnectionError("gone")
            except Exception:  # the server restarted, a firewall dropped it: a fresh one from the pool
                conn.invalidate()
                conn.close()
                return None
        return conn

    def _rest(self, conn: Connection) -> None:
        """Keep `conn` for the next poll, outside any transaction; a second one goes back to the pool."""
        # Options set on the connection (a server-side cursor's stream_results) would outlive the poll: not kept.
        if (self._rests and self.spec.idle_connections and not conn.invalidated
                and conn.get_execution_options() == self._options):
            try:
                if conn.in_transaction():
                    conn.rollback()
                raw: Any = conn.connection.dbapi_connection
                # The pool's reset on return, but for what psycopg would not roll back anyway (a call that costs).
                if not (self._psycopg and raw.autocommit and raw.pgconn.transaction_status == _IDLE):
                    conn.dialect.do_rollback(raw)
            except Exception:  # as the pool does with one its reset fails on: dropped, the poll's result stands
                conn.invalidate()
                conn.close()
                return
            with self._lock:
                if self._resting is None:
                    self._resting, self._rested_at = conn, time.monotonic()
                    return
            # Polls overlapped and another one rests: the pool would keep this one too, and an idle database
            # holds one connection, not two. Closed, its pool slot stays (the budget's count), empty.
            conn.invalidate()
        conn.close()

    def trim(self, now: float) -> None:
        """Close the connection kept between polls once it has been unused for `idle_timeout`."""
        if self._kept and now - self.last_used >= self.spec.idle_timeout:
            self.close_idle()

    def close_idle(self) -> None:
        # Only with every slot in hand: a connection checked out meanwhile would outlive its pool.
        if self.gate.acquire_all():
            try:
                self.dispose()
                self._kept = False
            finally:
                self.gate.release_all()

    def dispose(self) -> None:
        """Close every connection not in use: the resting one and the pool's."""
        with self._lock:
            conn, self._resting = self._resting, None
        if conn is not None:
            conn.close()
        self.engine.dispose()


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """The same watermark: the very same objects (a relation, a decoded position), not equal ones."""
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


class Databases:
    """The process's shared databases, by URL; a source opens one and closes it when done."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_url: dict[str, Database] = {}

    def open(self, spec: DatabaseSpec, *, statement_timeout: float | None, encoding: str) -> Database:
        """The shared database at `spec.url`, made on first use (the first source's settings are its defaults)."""
        with self._lock:
            database = self._by_url.get(spec.url)
            if database is None:
                engine = make_engine(
                    spec.url, statement_timeout=statement_timeout, encoding=encoding, connections=spec.connections
                )
                database = self._by_url[spec.url] = Database(spec, engine)
            database.users += 1
            return database

    def close(self, database: Database) -> None:
        with self._lock:
            database.users -= 1
            if database.users > 0 or self._by_url.get(database.spec.url) is not database:
                return
            del self._by_url[database.spec.url]
        database.dispose()

    def trim(self, now: float) -> None:
        with self._lock:
            open_now = list(self._by_url.values())
        for database in open_now:
            database.trim(now)

    def all(self) -> list[Database]:
        with self._lock:
            return list(self._by_url.values())


DATABASES = Databases()

_IDLE = 0  # psycopg.pq.TransactionStatus.IDLE: not inside a transaction


# `straw check` warns when a budget is larger than this share of the server's `max_connections`:
# the legacy application itself needs the rest.
SERVER_SHARE = 0.1

_MAX_CONNECTIONS = {
    "postgresql": "SHOW max_connections",
    "mysql": "SELECT @@max_connections",
    "mariadb": "SELECT @@max_connections",
}


def check_budget(spec: DatabaseSpec) -> tuple[str, bool]:
    """One line on the database's budget against the server's `max_connections`, and whether it is within it."""
    budget = f"budget {spec.connections} connection{'s' if spec.connections != 1 else ''}"
    budget += f", {spec.idle_connections} kept idle for {spec.idle_timeout:g}s"
    database = DATABASES.open(spec, statement_timeout=None, encoding="utf-8")
    try:
        query = _MAX_CONNECTIONS.get(database.engine.dialect.name)
        if query is None:
            return f"{budget} (the server does not tell its max_connections)", True
        with database.connect() as conn:
            server = int(conn.exec_driver_sql(query).scalar_one())
    finally:
        DATABASES.close(database)
    if spec.connections > server * SERVER_SHARE:
        return (
            f"{budget}: more than {SERVER_SHARE:.0%} of the server's max_connections {server}; "
            f"lower `connections` under `databases:` to {max(1, int(server * SERVER_SHARE))} or fewer",
            False,
        )
    return f"{budget} of the server's max_connections {server}", True
