"""An idle poll is one statement: the settle probe also asks whether any row is after the watermark.

The page query is skipped when the probe says no, so the probe must never say no while the read would
find a row: ties on the timestamp with a higher key, a position kept as text for a query source, text
keys the database orders otherwise than Python, NULLs, soft deletes, a row committed right after the
probe. Each case is tried on PostgreSQL and MariaDB (the two ledger techniques).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from psycopg import pq
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine

from adapters.db.direct import Direct
from adapters.db.poller import DbSource
from straw.config import DbSourceSpec

T0 = dt.datetime(2026, 11, 29, 8, 0, 0)


@pytest.fixture(params=["postgresql", "mariadb"])
def server_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue("pg_url" if request.param == "postgresql" else "mariadb_url"))


@pytest.fixture
def legacy(server_url: str) -> Iterator[Engine]:
    engine = create_engine(server_url)
    yield engine
    engine.dispose()


def _source(url: str, **spec: Any) -> DbSource:
    settings: dict[str, Any] = {"name": "s", "url": url, "entity": "item", "stream": "unused", **spec}
    return DbSource(DbSourceSpec.model_validate(settings), ["id"])


def _poll(source: DbSource, after: str | None) -> tuple[list[tuple[Any, ...]], str | None]:
    rows: list[tuple[Any, ...]] = []
    for batch in source.read(after):
        rows.extend(tuple(r) for r in batch.rows)
        after = batch.next_position
    return rows, after


class Wire:
    """What the source's connections send from now on. PostgreSQL: libpq's own trace of the protocol
    (the probe bypasses SQLAlchemy's events), from the connection's checkout; MariaDB: SQLAlchemy's
    statements and the DBAPI rollbacks."""

    def __init__(self, source: DbSource, path: Path) -> None:
        self.path, self.sent = path, list[str]()
        self.traced: list[Any] = []  # connections traced (libpq writes its trace out when untraced)
        self._file = path.open("w")
        engine = source.engine
        if engine.dialect.name == "postgresql":
            # The connection kept between polls rests checked out: closed, the next poll checks out one traced.
            source.database.dispose()

            @event.listens_for(engine, "checkout")
            def _trace(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
                self.traced.append(dbapi_connection)
                dbapi_connection.pgconn.trace(self._file.fileno())
                dbapi_connection.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)

            @event.listens_for(engine, "checkin")
            def _untrace(dbapi_connection: Any, _record: Any) -> None:
                if dbapi_connection is not None:
                    dbapi_connection.pgconn.untrace()
        else:

            @event.listens_for(engine, "before_cursor_execute")
            def _note(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
                self.sent.append(statement)

    def round_trips(self) -> list[str]:
        """PostgreSQL: one per ReadyForQuery, each named by what the client sent before it."""
        trips: list[str] = []
        pending: list[str] = []
        for line in self.path.read_text().splitlines():
            if not line.startswith(("F\t", "B\t")):
                continue  # a statement's text goes on over several lines
            direction, _length, message, *rest = line.split("\t")
            if direction == "F" and message in ("Query", "Parse", "Bind"):
                pending.append(f"{message} {' '.join(rest)[:60]}")
            elif direction == "B" and message == "ReadyForQuery":
                trips.append(" | ".join(pending))
                pending = []
        return trips

    def close(self) -> None:
        for dbapi_connection in self.traced:
            if not dbapi_connection.closed:
                dbapi_connection.pgconn.untrace()
        self._file.close()


def _timestamps(legacy: Engine, *rows: tuple[int, dt.datetime | None]) -> None:
    with legacy.begin() as conn:
        for key, at in rows:
            conn.execute(text("INSERT INTO items (id, changed_at) VALUES (:id, :at)"), {"id": key, "at": at})


@pytest.fixture
def items(legacy: Engine) -> Engine:
    with legacy.begin() as conn:
        conn.execute(text("CREATE TABLE items (id INTEGER PRIMARY KEY, changed_at TIMESTAMP(6) NULL, "
                          "deleted CHAR(1) NULL)"))
    _timestamps(legacy, (1, T0), (2, T0))
    return legacy


def test_an_idle_poll_is_one_round_trip_and_reads_nothing(server_url: str, items: Engine, tmp_path: Path) -> None:
    source = _source(server_url, table="items", mode="timestamp", timestamp_column="changed_at", key_column="id")
    try:
        rows, after = _poll(source, None)
        assert [r[0] for r in rows] == [1, 2]
        wire = Wire(source, tmp_path / "wire.log")
        for _ in range(8):
            assert _poll(source, after) == ([], after)
        wire.close()
        if source.engine.dialect.name == "postgresql":
            # One statement each: no BEGIN before it, no ROLLBACK after it, no page query.
            trips = wire.round_trips()
            assert not any("BEGIN" in t or "ROLLBACK" in t for t in trips), trips
            assert len(trips) == 8 and all(t.startswith('Parse  "" "SELECT') and "Bind" in t for t in trips), trips
            # Never prepared: a generic plan would not see the watermark's value (a scan of a big table).
            assert not any("_pg3_" in t for t in trips), trips
        else:  # MariaDB: the probe, between the ROLLBACKs that give it a read view of its own
            selects = [s for s in wire.sent if s.lstrip().upper().startswith("SELECT")]
            assert len(selects) == 8 and all("EXISTS" in s.upper() for s in selects), wire.sent
    finally:
        source.close()


def test_a_row_at_the_watermarks_timestamp_with_a_higher_key_is_read(server_url: str, items: Engine) -> None:
    source = _source(server_url, table="items", mode="timestamp", timestamp_column="changed_at", key_column="id")
    try:
        _rows, after = _poll(source, None)
        _timestamps(items, (3, T0))  # the highest timestamp is still the watermark's own
        rows, after = _poll(source, after)
        assert [r[0] for r in rows] == [3]
        _timestamps(items, (0, T0))  # a lower key at that timestamp is behind the watermark: not read, by design
        assert _poll(source, after) == ([], after)
    finally:
        source.close()


def test_null_timestamps_are_neither_read_nor_break_the_probe(server_url: str, items: Engine) -> None:
    source = _source(server_url, table="items", mode="timestamp", timestamp_column="changed_at", key_column="id")
    try:
        _timestamps(items, (7, None))
        rows, after = _poll(source, None)
        assert [r[0] for r in rows] == [1, 2]
        assert _poll(source, after) == ([], after)
        _timestamps(items, (8, T0 + dt.timedelta(seconds=1)))
        assert [r[0] for r in _poll(source, after)[0]] == [8]
    finally:
        source.close()


def test_a_soft_delete_with_a_newer_timestamp_is_read_as_a_delete(server_url: str, items: Engine) -> None:
    source = _source(server_url, table="items", mode="timestamp", timestamp_column="changed_at", key_column="id",
                     soft_delete={"column": "deleted", "value": "J"})
    try:
        _rows, after = _poll(source, None)
        with items.begin() as conn:
            conn.execute(text("UPDATE items SET deleted = 'J', changed_at = :at WHERE id = 1"),
                         {"at": T0 + dt.timedelta(seconds=5)})
        batches = list(source.read(after))
        assert [(r[0], op) for b in batches for r, op in zip(b.rows, b.ops or [], strict=True)] == [
            (1, "deleted")]
    finally:
        source.close()


def test_a_query_sources_position_kept_as_text_is_compared_by_the_database(server_url: str, items: Engine) -> None:
    # A query's column types are unknown: its position holds the timestamp as ISO text, bound untyped.
    source = _source(server_url, query="SELECT id, changed_at FROM items", mode="timestamp",
                     timestamp_column="changed_at", key_column="id")
    try:
        _rows, after = _poll(source, None)
        assert after is not None and "2026-11-29T08:00:00" in after
        assert _poll(source, after) == ([], after)
        _timestamps(items, (3, T0))
        rows, after = _poll(source, after)
        assert [r[0] for r in rows] == [3]
        assert _poll(source, after) == ([], after)
    finally:
        source.close()


def test_text_ids_follow_the_databases_order_not_pythons(server_url: str, legacy: Engine) -> None:
    """MariaDB compares text case-insensitively ('a' < 'B'), Python by code point ('B' < 'a'): a probe that
    compared the highest value with the position in Python would call 'B' old news and never read it."""
    with legacy.begin() as conn:
        conn.execute(text("CREATE TABLE codes (code VARCHAR(10) PRIMARY KEY, id INTEGER)"))
        conn.execute(text("INSERT INTO codes VALUES ('a', 1)"))
    source = _source(server_url, table="codes", mode="incrementing", incrementing_column="code")
    try:
        rows, after = _poll(source, None)
        assert [r[0] for r in rows] == [1]
        with legacy.begin() as conn:
            conn.execute(text("INSERT INTO codes VALUES ('B', 2)"))
            after_a = conn.execute(text("SELECT count(*) FROM codes WHERE code > 'a'")).scalar_one()
        rows, after = _poll(source, after)
        assert len(rows) == after_a  # exactly what the database orders after 'a'
        assert _poll(source, after) == ([], after)
    finally:
        source.close()


def test_a_row_committed_right_after_the_probe_is_read_by_the_next_poll(
    server_url: str, items: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probe saw nothing after the watermark; a writer commits before the poll ends. That poll reads
    nothing and keeps its position, so the next one reads the row: delayed one poll, never skipped."""
    source = _source(server_url, table="items", mode="timestamp", timestamp_column="changed_at", key_column="id")
    try:
        _rows, after = _poll(source, None)
        committed: list[int] = []
        probe = Direct.one

        def probe_then_write(self: Direct, conn: Any, params: dict[str, Any]) -> tuple[Any, ...]:
            found = probe(self, conn, params)
            if not committed:  # a writer commits between the probe and where the page query would run
                committed.append(4)
                _timestamps(items, (4, T0 + dt.timedelta(seconds=1)))
            return found

        monkeypatch.setattr(Direct, "one", probe_then_write)
        rows, same = _poll(source, after)
        assert committed == [4]
        assert rows == [] and same == after
        rows, after = _poll(source, after)
        assert [r[0] for r in rows] == [4]
        assert _poll(source, after) == ([], after)
    finally:
        source.close()


def test_a_poll_after_the_server_dropped_its_connection_recovers(pg_url: str) -> None:
    """The probe runs in autocommit; a connection killed under it is not pooled again as it is."""
    legacy = create_engine(pg_url, isolation_level="AUTOCOMMIT")
    try:
        with legacy.begin() as conn:
            conn.execute(text("CREATE TABLE items (id INTEGER PRIMARY KEY, changed_at TIMESTAMP(6))"))
        _timestamps(legacy, (1, T0))
        source = _source(pg_url, table="items", mode="timestamp", timestamp_column="changed_at", key_column="id")
        try:
            _rows, after = _poll(source, None)
            with legacy.connect() as conn:
                conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                  "WHERE datname = current_database() AND pid <> pg_backend_pid()"))
            with pytest.raises(Exception):  # noqa: B017 - the driver's own error, whichever it is
                _poll(source, after)
            _timestamps(legacy, (2, T0 + dt.timedelta(seconds=1)))
            rows, after = _poll(source, after)
            assert [r[0] for r in rows] == [2]
            with source.connect() as conn:
                assert conn.connection.dbapi_connection.autocommit is False  # type: ignore[union-attr]
        finally:
            source.close()
    finally:
        legacy.dispose()


def test_idle_probes_of_sources_due_together_go_in_one_statement_and_lose_nothing(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four idle sources on one database, all due: the first poll asks for all four, the other three send
    nothing. A row committed after that answer is read by the source's next poll; a member whose table is
    gone fails the batch, not the poll that sent it."""
    import adapters.db.budget

    monkeypatch.setattr(adapters.db.budget, "BATCH_SHARE", 1.0)  # every source polled once is "due soon"
    monkeypatch.setattr(adapters.db.budget, "BATCH_WINDOW", 30.0)
    legacy = create_engine(pg_url)
    sources: list[DbSource] = []
    try:
        with legacy.begin() as conn:
            for t in range(4):
                conn.execute(text(f"CREATE TABLE items{t} (id INTEGER PRIMARY KEY, changed_at TIMESTAMP(6))"))
                conn.execute(text(f"INSERT INTO items{t} VALUES (1, :at)"), {"at": T0})
        sources = [
            _source(pg_url, name=f"s{t}", table=f"items{t}", mode="timestamp", timestamp_column="changed_at",
                    key_column="id", poll_interval=1.0)
            for t in range(4)
        ]
        afters = []
        for source in sources:
            rows, after = _poll(source, None)
            assert [r[0] for r in rows] == [1]
            afters.append(after)
        for source, after in zip(sources, afters, strict=True):  # each now has a watermark to ask about
            assert _poll(source, after) == ([], after)
        wire = Wire(sources[0], tmp_path / "wire.log")
        for source, after in zip(sources, afters, strict=True):
            assert _poll(source, after) == ([], after)
        wire.close()
        trips = wire.round_trips()
        # One statement for the four: their EXISTS, two watermark values each.
        assert len(trips) == 1 and 'SELECT (SELECT EXISTS' in trips[0] and 'Bind  "" "" 8 ' in trips[0], trips

        # s2 was answered by that statement: a row committed since waits for its next poll (as if this one had
        # run a moment early), which asks anew and reads it.
        with legacy.begin() as conn:
            conn.execute(text("INSERT INTO items2 VALUES (2, :at)"), {"at": T0 + dt.timedelta(seconds=1)})
        assert _poll(sources[2], afters[2]) == ([], afters[2])
        rows, after = _poll(sources[2], afters[2])
        assert [r[0] for r in rows] == [2]
        afters[2] = after

        with legacy.begin() as conn:
            conn.execute(text("DROP TABLE items3"))
        for _ in range(2):  # answered, then asking: the batch (with s3) fails, and s0 asks alone
            assert _poll(sources[0], afters[0]) == ([], afters[0])
        with sources[0].connect(autocommit=True) as conn:
            assert sources[0].database.nothing_after(sources[0], conn) is False  # batches paused a while
        _poll(sources[3], afters[3])  # its answer, taken before the drop, if any
        with pytest.raises(Exception, match="items3"):
            _poll(sources[3], afters[3])
    finally:
        for source in sources:
            source.close()
        legacy.dispose()
