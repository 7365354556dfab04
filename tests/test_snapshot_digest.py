"""Snapshot digests computed by the database: never equal for different rows, stable for the same, and a
listing that reads only new and changed rows in full, on real PostgreSQL and MariaDB."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable, Iterator, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import (
    CHAR,
    BigInteger,
    Column,
    DateTime,
    Engine,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    String,
    Table,
    create_engine,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.dialects import mysql
from structlog.testing import capture_logs

from adapters.db import digest
from adapters.db.poller import DbSource
from bus.redis import RedisBus
from fixtures.legacy_orders import create_orders, order_rows
from outbox.relay import adopt_streams
from outbox.store import Outbox
from straw.config_load import ConfigError, load_config
from straw.runner import Pipeline, build_pipeline, poll
from tests.helpers import orders_config
from tests.test_db_snapshot import snapshot_config

DIALECTS = ["pg_url", "mariadb_url"]


@pytest.fixture(params=DIALECTS)
def url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue(request.param))


# --- the digest itself: hostile values -------------------------------------------------------------------------

HOSTILE_TEXT = ["", " ", "a", "a ", " a", "A", "NULL", "null", "N", "V1:a", ",", '"', "\\", "(", ")", "()", '""',
                "a,b", "é", "e\u0301", "\u00a0", "\t", "\n", "😀", "ß", "ss"]
texts = st.one_of(st.none(), st.sampled_from(HOSTILE_TEXT),
                  st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=12))
chars = st.one_of(st.none(), st.sampled_from(["", "a", "a ", "A", " a", "é", "abcd"]))
numbers = st.one_of(st.none(), st.sampled_from([Decimal("1.0"), Decimal("1.00"), Decimal("1"), Decimal("-0"),
                                                Decimal("0.0001"), Decimal("10")]),
                    st.decimals(min_value=-10**7, max_value=10**7, places=4, allow_nan=False))
doubles = st.one_of(st.none(), st.sampled_from([0.1, 0.1 + 0.2, 0.30000000000000004, 1.0, 1.0000000000000002, 1e300]),
                    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e300, max_value=1e300))
singles = st.one_of(st.none(), st.sampled_from([1.0, 1.0000001, 3.4028234e38, 3.4028233e38]),
                    st.floats(width=32, allow_nan=False, allow_infinity=False, min_value=-(2.0**100),
                              max_value=2.0**100))
times = st.one_of(st.none(), st.datetimes(min_value=dt.datetime(1900, 1, 1), max_value=dt.datetime(2100, 1, 1)))
blobs = st.one_of(st.none(), st.sampled_from([b"", b"\x00", b"N", b"V1:"]), st.binary(max_size=8))
ROW = st.tuples(texts, chars, numbers, doubles, singles, times, blobs)
NAMES = ("t", "c", "n", "f", "r", "ts", "b")


def hostile_table(metadata: MetaData) -> Table:
    return Table(
        "hostile", metadata,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("t", String(60).with_variant(mysql.VARCHAR(60, charset="utf8mb4", collation="utf8mb4_general_ci"),
                                            "mysql", "mariadb")),
        Column("c", CHAR(4)),
        Column("n", Numeric(14, 4)),
        Column("f", Float(53)),
        Column("r", Float(24)),
        Column("ts", DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")),
        Column("b", LargeBinary().with_variant(mysql.VARBINARY(16), "mysql", "mariadb")),
    )


@pytest.fixture
def hostile(url: str) -> Iterator[tuple[Engine, Table]]:
    engine = create_engine(url)
    metadata = MetaData()
    table = hostile_table(metadata)
    metadata.create_all(engine)
    yield engine, table
    engine.dispose()


def _digests(engine: Engine, table: Table, salt: str = "s") -> list[tuple[tuple[str, ...], bytes]]:
    """Each row as read back (values by repr, so -0.0 and 0.0 differ) with its digest, in id order."""
    columns = [table.c[n] for n in NAMES]
    stmt = select(*columns, digest.expression(engine.dialect.name, columns)).order_by(table.c.id)
    with engine.connect() as conn:
        return [(tuple(repr(v) for v in row[:-1]), row[-1]) for row in conn.execute(stmt, {"straw_salt": salt})]


def _same(row: tuple[Any, ...], other: tuple[Any, ...]) -> bool:
    """Equal values written: as Python's ==, but 0.0 and -0.0 differ (they are two values in a float column)."""
    return all(x is y or (x == y and (not isinstance(x, float) or math.copysign(1, x) == math.copysign(1, y)))
               for x, y in zip(row, other, strict=True))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(a=ROW, b=ROW, column=st.integers(0, len(NAMES) - 1), same=st.booleans())
@example(a=("", "", Decimal("1.0"), 0.0, 0.0, dt.datetime(2000, 1, 1), b""),  # 0.0 and -0.0: equal to Python,
         b=("", "", Decimal("1.0"), 0.0, -0.0, dt.datetime(2000, 1, 1), b""),  # two values in a float column
         column=0, same=False)
def test_a_row_that_differs_in_any_column_has_another_digest(
    hostile: tuple[Engine, Table], a: tuple[Any, ...], b: tuple[Any, ...], column: int, same: bool
) -> None:
    engine, table = hostile
    # b: one column of a changed (the usual change), a itself, or a whole other row
    other = a if same else (*a[:column], b[column], *a[column + 1:]) if b[column] != a[column] else b
    with engine.begin() as conn:
        conn.execute(delete(table))
        conn.execute(insert(table), [{"id": i, **dict(zip(NAMES, row, strict=True))}
                                     for i, row in enumerate((a, other, a))])
    (read_a, digest_a), (read_b, digest_b), (read_again, digest_again) = _digests(engine, table)
    assert len(digest_a) == 17 and digest_a[:1] == b"d"  # never equal to a Python digest (16 bytes)
    assert (read_again, digest_again) == (read_a, digest_a)  # the same values: the same digest
    if read_a != read_b:
        assert digest_a != digest_b, f"{read_a} and {read_b} share a digest"
    if _same(other, a):  # (read-back values can match where the stored ones differ: MariaDB's FLOAT as text)
        assert digest_a == digest_b, f"{read_a} has two digests"
    assert _digests(engine, table, salt="t")[0][1] != digest_a  # the salt (the mapping's shape) keys it


def test_timestamps_with_zones_digest_the_instant(url: str) -> None:
    """PostgreSQL timestamptz: one instant written in two offsets is one value; another instant is another."""
    if not url.startswith("postgresql"):
        pytest.skip("MariaDB's TIMESTAMP has no zone of its own (DATETIME is covered by the property test)")
    engine = create_engine(url)
    metadata = MetaData()
    table = Table("zoned", metadata, Column("id", Integer, primary_key=True), Column("at", DateTime(timezone=True)))
    metadata.create_all(engine)
    utc = dt.datetime(2024, 3, 31, 1, 30, tzinfo=dt.UTC)
    with engine.begin() as conn:
        conn.execute(insert(table), [
            {"id": 1, "at": utc}, {"id": 2, "at": utc.astimezone(dt.timezone(dt.timedelta(hours=2)))},
            {"id": 3, "at": utc + dt.timedelta(microseconds=1)},
        ])
        stmt = select(digest.expression("postgresql", [table.c.at])).order_by(table.c.id)
        first, second, third = conn.execute(stmt, {"straw_salt": ""}).scalars()
    assert first == second != third
    engine.dispose()


# --- the listing: only new and changed rows are read in full -----------------------------------------------------


class Fetches:
    """Counts the rows a digest listing reads in full (wrapping the source's own fetch, nothing faked)."""

    def __init__(self, source: DbSource) -> None:
        self.rows = 0
        real = source._digest_fetch

        def counted(*args: Any) -> Any:
            batch = real(*args)
            self.rows += len(batch.rows)
            return batch

        source._digest_fetch = counted  # type: ignore[method-assign,assignment]


def _open(path: Path, redis_client: redis.Redis, stream: str) -> tuple[Pipeline, Outbox, Fetches]:
    config = load_config(path)
    pipeline = build_pipeline(config, config.sources[0])
    outbox = Outbox(config.outbox.path)
    adopt_streams(RedisBus(redis_client), outbox, [stream])
    assert isinstance(pipeline.source, DbSource)
    return pipeline, outbox, Fetches(pipeline.source)


def _events(outbox: Outbox, start: int = 0) -> list[tuple[str, str]]:
    """The events the outbox holds (the bus is not what these tests are about), from the `start`th on."""
    events = [orjson.loads(r.event) for r in outbox.events()][start:]
    return [(e["type"], e["subject"]) for e in events]


def _data(outbox: Outbox, index: int) -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads(outbox.events()[index].event)["data"]
    return data


def _count_matches(outbox: Outbox) -> list[int]:
    """The rows of each page `Outbox.by_digest` found unchanged (wrapping the real one)."""
    counts: list[int] = []
    real = outbox.by_digest

    def counted(source: str, ends: Sequence[str], listed: Sequence[bytes | None]) -> list[Any]:
        found = real(source, ends, listed)
        counts.append(sum(row is not None for row in found))
        return found

    outbox.by_digest = counted  # type: ignore[method-assign]
    return counts


def test_listing_reads_only_new_and_changed_rows(
    tmp_path: Path, url: str, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    engine = create_engine(url)
    table = create_orders(engine, 45)
    # pages of 20 keys: three per listing
    path = snapshot_config(tmp_path, url, redis_url, stream_name, batch_size=2)
    pipeline, outbox, fetched = _open(path, redis_client, stream_name)
    source = pipeline.source
    assert isinstance(source, DbSource)
    try:
        assert source.digest_choice().database
        assert "digest: database (md5" in source.check()
        assert poll(pipeline, outbox) == 45 and fetched.rows == 45  # a first listing: every row is new
        assert len(_events(outbox)) == 45

        fetched.rows = 0
        matched = _count_matches(outbox)
        assert poll(pipeline, outbox) == 45
        assert fetched.rows == 0 and len(_events(outbox)) == 45  # unchanged: keys and digests only
        assert matched == [20, 20]  # two full pages by digest alone, the last one's 5 rows key by key

        with engine.begin() as conn:
            conn.execute(update(table).where(table.c.ORDER_NO == 5).values(NOTE=""))  # NULL -> ''
            conn.execute(update(table).where(table.c.ORDER_NO == 30).values(STATUS="X"))
            conn.execute(delete(table).where(table.c.ORDER_NO.in_([7, 40])))
            conn.execute(insert(table), order_rows(1, first=46))
        assert poll(pipeline, outbox) == 44
        assert fetched.rows == 3  # 5, 30 and the new 46
        assert _events(outbox, 45) == [
            ("order.upserted", "5"), ("order.upserted", "30"), ("order.upserted", "46"),
            ("order.deleted", "7"), ("order.deleted", "40"),
        ]
        assert _data(outbox, 45)["note"] == "" and _data(outbox, 46)["status"] == "X"

        fetched.rows = 0
        assert poll(pipeline, outbox) == 44 and fetched.rows == 0 and len(_events(outbox)) == 50
    finally:
        outbox.close()
        pipeline.source.close()
    engine.dispose()


def test_a_changed_mapping_reads_every_row_again_once(
    tmp_path: Path, url: str, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    """The digest is keyed by the mapping's shape: a row whose digest is equal is never mapped, so a new
    mapping must not find the old digests equal."""
    engine = create_engine(url)
    create_orders(engine, 12)
    path = snapshot_config(tmp_path, url, redis_url, stream_name)
    pipeline, outbox, _fetched = _open(path, redis_client, stream_name)
    try:
        poll(pipeline, outbox)
    finally:
        outbox.close()
        pipeline.source.close()
    path = snapshot_config(tmp_path, url, redis_url, stream_name, trim_char=True)
    pipeline, outbox, fetched = _open(path, redis_client, stream_name)
    try:
        poll(pipeline, outbox)
        assert fetched.rows == 12
        fetched.rows = 0
        poll(pipeline, outbox)
        assert fetched.rows == 0
    finally:
        outbox.close()
        pipeline.source.close()
    engine.dispose()


@pytest.mark.parametrize("first", ["python", "database"])
def test_switching_digest_kind_sends_nothing_for_unchanged_rows(
    tmp_path: Path, url: str, redis_url: str, redis_client: redis.Redis, stream_name: str, first: str
) -> None:
    """Stored digests of the other kind never compare equal: the switch reads every row once, maps it, and only
    a row whose canonical data changed is an event; a log line says so."""
    engine = create_engine(url)
    table = create_orders(engine, 25)
    then = "python" if first == "database" else "database"
    pipeline, outbox, _fetched = _open(snapshot_config(tmp_path, url, redis_url, stream_name, digest=first),
                                       redis_client, stream_name)
    try:
        assert poll(pipeline, outbox) == 25
    finally:
        outbox.close()
        pipeline.source.close()
    with engine.begin() as conn:
        conn.execute(update(table).where(table.c.ORDER_NO == 9).values(STATUS="SWITCHED"))
    pipeline, outbox, fetched = _open(snapshot_config(tmp_path, url, redis_url, stream_name, digest=then),
                                      redis_client, stream_name)
    try:
        with capture_logs() as logs:
            assert poll(pipeline, outbox) == 25
        assert fetched.rows == (25 if then == "database" else 0)
        assert _events(outbox, 25) == [("order.upserted", "9")]
        notes = [e for e in logs if e["event"].startswith("snapshot digests changed kind")]
        assert len(notes) == 1 and notes[0]["source"] == "orders"
        fetched.rows = 0
        with capture_logs() as logs:
            poll(pipeline, outbox)
        assert fetched.rows == 0 and len(_events(outbox)) == 26 and not logs
    finally:
        outbox.close()
        pipeline.source.close()
    engine.dispose()


def test_resumes_after_the_last_committed_page(
    tmp_path: Path, url: str, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    """A poll cut at `max_rows_per_poll` stands mid-listing; the next resumes after its last key, and the
    listing's end deletes only what no part of it saw."""
    engine = create_engine(url)
    table = create_orders(engine, 30)
    path = snapshot_config(tmp_path, url, redis_url, stream_name, batch_size=1, max_rows_per_poll=8)
    pipeline, outbox, fetched = _open(path, redis_client, stream_name)
    try:
        assert [poll(pipeline, outbox) for _ in range(4)] == [8, 8, 8, 6]
        fetched.rows = 0
        assert [poll(pipeline, outbox) for _ in range(2)] == [8, 8]  # the next listing: keys 1-16
        with engine.begin() as conn:
            conn.execute(delete(table).where(table.c.ORDER_NO.in_([3, 20])))  # one listed already, one not
            conn.execute(update(table).where(table.c.ORDER_NO == 25).values(STATUS="LATE"))
        assert [poll(pipeline, outbox) for _ in range(2)] == [8, 5]
        assert fetched.rows == 1
        assert _events(outbox, 30) == [("order.upserted", "25"), ("order.deleted", "20")]
        assert [poll(pipeline, outbox) for _ in range(4)] == [8, 8, 8, 4]  # key 3's deletion: in this listing
        assert _events(outbox, 32) == [("order.deleted", "3")]
    finally:
        outbox.close()
        pipeline.source.close()
    engine.dispose()


def test_composite_keys_and_a_query_source(pg_url: str, tmp_path: Path) -> None:
    """`auto` keeps the Python digest for a query (no key index known) and for a table keyed off its primary
    key; `database` is taken where it was asked for."""
    engine = create_engine(pg_url)
    metadata = MetaData()
    Table("lines", metadata, Column("order_no", BigInteger, primary_key=True),
          Column("line_no", Integer, primary_key=True), Column("qty", Integer))
    metadata.create_all(engine)
    from sqlalchemy import text

    source_for: Callable[..., DbSource] = _source_for(pg_url)
    assert source_for(table="lines", keys=["order_no", "line_no"]).digest_choice().database
    assert not source_for(table="lines", keys=["qty"]).digest_choice().database
    assert not source_for(query="SELECT * FROM lines", keys=["order_no", "line_no"]).digest_choice().database
    assert source_for(query="SELECT * FROM lines", keys=["order_no", "line_no"],
                      digest="database").digest_choice().database
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO lines VALUES (1, 1, 5), (1, 2, 6), (2, 1, 7)"))
    source = source_for(query="SELECT * FROM lines", keys=["order_no", "line_no"], digest="database")
    reading = source.read(None)
    batch = next(reading)  # its fetch runs while the listing stands at it, as the runner calls it
    assert [tuple(r[:2]) for r in batch.rows] == [(1, 1), (1, 2), (2, 1)] and batch.complete
    assert batch.fetch is not None and batch.digests is not None
    full = batch.fetch([1])
    assert [tuple(r) for r in full.rows] == [(1, 2, 6)] and full.digests == [batch.digests[1]]
    assert list(reading) == []
    source.close()
    engine.dispose()


def _source_for(url: str) -> Callable[..., DbSource]:
    from straw.config import DbSourceSpec

    def make(*, keys: Sequence[str], digest: str = "auto", **where: Any) -> DbSource:
        spec = DbSourceSpec.model_validate({"name": "lines", "url": url, "mode": "snapshot", "entity": "line",
                                            "stream": "s", "digest": digest, **where})
        return DbSource(spec, list(dict.fromkeys([*keys, "qty"])), key_columns=keys)

    return make


@pytest.mark.parametrize(("url", "source", "message"), [
    ("sqlite", {"mode": "snapshot", "digest": "database"}, "needs PostgreSQL or MariaDB/MySQL"),
    ("postgresql+psycopg://straw@127.0.0.1/erp", {"mode": "incrementing", "digest": "python"},
     "applies to mode 'snapshot'"),
    ("postgresql+psycopg://straw@127.0.0.1/erp", {"mode": "snapshot", "digest": "md5"}, "digest"),
])
def test_config_refuses_a_digest_that_cannot_work(
    tmp_path: Path, url: str, source: dict[str, Any], message: str
) -> None:
    if url == "sqlite":
        (tmp_path / "legacy.db").touch()
        url = f"sqlite:///{tmp_path / 'legacy.db'}"
    path = orders_config(tmp_path, db_url=url, redis_url="redis://127.0.0.1:6379/0", stream="s", **source)
    text = path.read_text()
    if source["mode"] == "snapshot":  # the helper's timestamp columns: not for a snapshot
        text = "\n".join(line for line in text.splitlines() if "timestamp_column" not in line
                         and "key_column" not in line)
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert message in str(error.value) and "digest" in str(error.value)


def test_single_floats_that_differ_beyond_six_digits_differ(hostile: tuple[Engine, Table]) -> None:
    """MariaDB renders a FLOAT with 6 significant digits: the digest widens it to a DOUBLE first."""
    engine, table = hostile
    with engine.begin() as conn:
        conn.execute(insert(table), [{"id": 1, "r": 1.0000001}, {"id": 2, "r": 1.0000002}, {"id": 3, "r": 1.0}])
    digests = [d for _row, d in _digests(engine, table)]
    assert len(set(digests)) == 3


def test_a_python_digest_that_starts_like_a_database_one_is_not_taken_for_one() -> None:
    from straw.source import database_digest

    assert not database_digest(b"d" + bytes(15))  # 16 bytes: blake2b's, whatever its first byte
    assert database_digest(b"d" + bytes(16))


# --- pages compared by digest alone, the next page read ahead: the same events as key by key ---------------------

_TABLES = iter(range(10**6))
# (key, status): set STATUS (inserting the fixture's row if the key is not there), None: delete it;
# (key, "again"): delete the row and insert it back as it was (an equal digest under the same key)
_CHANGES = st.lists(st.tuples(st.integers(1, 48), st.sampled_from(["NEW", "PAID", "LATE", None, "again"])),
                    max_size=10)


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(rounds=st.lists(_CHANGES, min_size=1, max_size=3))
def test_digest_pages_send_exactly_what_changed(
    tmp_path: Path, pg_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str,
    rounds: list[list[tuple[int, str | None]]],
) -> None:
    """Pages of 10 keys, most rows marked by their digest alone (`Outbox.by_digest`), the rest by key: keys
    inserted between others (their ids come last), deleted, deleted and inserted back as they were or changed,
    deleted in one listing and back in a later one. Each listing sends exactly the model's changes, and
    reads rows in full only where something is upserted."""
    name = f"ORDERS_P{next(_TABLES)}"
    engine = create_engine(pg_url)
    table = create_orders(engine, 40, name=name)
    work = tmp_path / name
    work.mkdir()
    path = snapshot_config(work, pg_url, redis_url, stream_name, table=name, batch_size=1)
    pipeline, outbox, fetched = _open(path, redis_client, stream_name)
    originals = {row["ORDER_NO"]: row for row in order_rows(48)}  # the first 40 as create_orders wrote them
    current = {key: originals[key] for key in range(1, 41)}
    delivered = {key: row["STATUS"] for key, row in current.items()}
    try:
        poll(pipeline, outbox)
        seen = len(_events(outbox))
        assert seen == 40
        for changes in rounds:
            number = table.c["ORDER_NO"]
            with engine.begin() as conn:
                for key, status in changes:
                    row = current.get(key)
                    if status is None or (status == "again" and row is not None):
                        conn.execute(delete(table).where(number == key))
                    if status is None or status == "again":
                        if status == "again" and row is not None:
                            conn.execute(insert(table), [row])
                        else:
                            current.pop(key, None)
                    elif row is not None:
                        conn.execute(update(table).where(number == key).values(STATUS=status))
                        current[key] = {**row, "STATUS": status}
                    else:
                        current[key] = {**originals[key], "STATUS": status}  # only STATUS differs
                        conn.execute(insert(table), [current[key]])
            fetched.rows = 0
            poll(pipeline, outbox)
            upserted = {str(k) for k, row in current.items() if delivered.get(k) != row["STATUS"]}
            deleted = {str(k) for k in delivered if k not in current}
            events = _events(outbox, seen)
            assert sorted(events) == sorted([("order.upserted", k) for k in upserted]
                                            + [("order.deleted", k) for k in deleted])
            # A page with several changed keys reads their key range (unchanged rows in it too); nothing else.
            assert len(upserted) <= fetched.rows and (fetched.rows == 0) == (not upserted)
            seen += len(events)
            delivered = {k: row["STATUS"] for k, row in current.items()}
    finally:
        outbox.close()
        pipeline.source.close()
        table.drop(engine)
        engine.dispose()


def _budgeted_source(url: str, connections: int) -> DbSource:
    from straw.config import DatabaseSpec, DbSourceSpec

    spec = DbSourceSpec.model_validate({"name": "orders", "url": url, "table": "ORDERS", "mode": "snapshot",
                                        "entity": "order", "stream": "s", "digest": "database", "batch_size": 1})
    return DbSource(spec, ["ORDER_NO", "STATUS"], key_columns=["ORDER_NO"],
                    database=DatabaseSpec(url=url, connections=connections))


@pytest.mark.parametrize("connections", [1, 2])
def test_the_next_page_is_read_ahead_only_on_a_free_connection(url: str, connections: int) -> None:
    """With a budget of one the listing reads its pages in turn (waiting for a second connection would wait
    forever); with two the next page is read on the second while this one is compared. Either way the pages
    are the same, and a listing left half-way gives both connections back."""
    engine = create_engine(url)
    create_orders(engine, 35)
    source = _budgeted_source(url, connections)
    gate = source.database.gate
    try:
        reading = source.read(None)
        first = next(reading)
        assert gate.in_use == connections  # the listing's connection, and the one reading ahead if free
        assert [r[0] for r in first.rows] == list(range(1, 11)) and first.fetch is not None
        assert {r[0] for r in first.fetch([0, 9]).rows} >= {1, 10}  # while the next page is being read
        second = next(reading)
        assert [r[0] for r in second.rows] == list(range(11, 21))
        reading.close()  # a stop mid-listing
        assert gate.in_use == 0
        pages = list(source.read(None))
        assert [len(p.rows) for p in pages] == [10, 10, 10, 5] and pages[-1].complete
        assert gate.in_use == 0
    finally:
        source.close()
        engine.dispose()


def test_a_spare_connection_is_taken_only_when_free_and_unawaited() -> None:
    from adapters.db.budget import Gate

    gate = Gate(2)
    assert gate.try_acquire() and gate.try_acquire() and not gate.try_acquire()
    gate.release()
    gate.release()
    assert gate.in_use == 0


def test_a_poll_waiting_for_a_connection_gets_the_spare_back(pg_url: str) -> None:
    """The listing lends its second connection back as soon as another poll waits for one: a source due
    meanwhile waits for one page, not for the whole listing."""
    import threading

    engine = create_engine(pg_url)
    create_orders(engine, 35)
    source = _budgeted_source(pg_url, 2)
    gate = source.database.gate
    served = threading.Event()

    def other_poll() -> None:
        with source.database.connect():
            served.set()

    try:
        reading = source.read(None)
        assert [r[0] for r in next(reading).rows] == list(range(1, 11)) and gate.in_use == 2
        waiter = threading.Thread(target=other_poll)
        waiter.start()
        while not gate.waiting:
            served.wait(0.001)
        assert [r[0] for r in next(reading).rows] == list(range(11, 21))  # read ahead, then lent back
        assert served.wait(10)
        waiter.join()
        assert [len(p.rows) for p in reading] == [10, 5] and gate.in_use == 0
    finally:
        source.close()
        engine.dispose()
