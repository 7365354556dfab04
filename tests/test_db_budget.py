"""Issue 16: hundreds of sources on one legacy database within a bounded connection budget.

The proof runs on private servers with a low `max_connections` (PostgreSQL 20, MariaDB 10):
300 tables, one source each; every row is delivered by `run --once` and by `run`, straw's
connections (sampled from a thread) never exceed the budget, and a separate client can
always connect.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from sqlalchemy import create_engine, text

from adapters.db.budget import DATABASES, Gate
from adapters.db.poller import DbSource
from fixtures.private_sql import private_mariadb, private_postgres
from straw.config import DatabaseSpec, DbSourceSpec
from straw.config_load import ConfigError, load_config
from straw.runner import Runner
from tests.test_cli import invoke

TABLES = 300
ROWS = 3
ITEM = {"key": ["id"], "fields": {"id": "integer", "name": "string", "changed_at": "datetime"}}


def _fill(url: str, tables: int, first_id: int = 1) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        for t in range(tables):
            if first_id == 1:
                conn.execute(text(f"CREATE TABLE t{t:03d} (id INTEGER PRIMARY KEY, name VARCHAR(20), "
                                  "changed_at TIMESTAMP(6) NULL)"))
            for i in range(first_id, first_id + ROWS):
                conn.execute(text(f"INSERT INTO t{t:03d} VALUES ({i}, 'row {i}', '2026-11-29 08:00:{i % 60:02d}')"))
    engine.dispose()


def _config(
    directory: Path, url: str, redis_url: str, stream: str, tables: int, source: dict[str, Any] | None = None,
    **database: Any,
) -> Path:
    sources = [
        {"name": f"t{t:03d}", "url": url, "table": f"t{t:03d}", "mode": "timestamp", "timestamp_column": "changed_at",
         "key_column": "id", "entity": "item", "stream": stream, "poll_interval": 0.5, **(source or {})}
        for t in range(tables)
    ]
    config: dict[str, Any] = {
        "instance": "budget",
        "redis": {"url": redis_url},
        "outbox": {"path": str(directory / "outbox.db")},
        "relay": {"idle_interval": 0.02, "backoff_max": 1.0},
        "entities": {"item": ITEM},
        "sources": sources,
    }
    if database:
        config["databases"] = [{"url": url, **database}]
    path = directory / "straw.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class Sampler(threading.Thread):
    """Every few milliseconds, a new client connects (it must always be able to) and counts the others."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.stop = threading.Event()
        self.peak = 0
        self.samples = 0
        self.refused: list[str] = []
        postgres = url.startswith("postgresql")
        self.count = (
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
            if postgres else
            "SELECT count(*) FROM information_schema.PROCESSLIST WHERE ID <> CONNECTION_ID() AND COMMAND <> 'Daemon'"
        )

    def run(self) -> None:
        from sqlalchemy.pool import NullPool

        engine = create_engine(self.url, poolclass=NullPool)  # a fresh connection each time
        while not self.stop.is_set():
            try:
                with engine.connect() as conn:
                    self.peak = max(self.peak, int(conn.execute(text(self.count)).scalar_one()))
                self.samples += 1
            except Exception as exc:
                self.refused.append(f"{type(exc).__name__}: {exc}"[:200])
            self.stop.wait(0.02)
        engine.dispose()

    def __enter__(self) -> Sampler:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop.set()
        self.join()


def _stream_length(url: str, stream: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        return int(client.xlen(stream))
    finally:
        client.close()


def _await_length(redis_url: str, stream: str, length: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while _stream_length(redis_url, stream) < length:
        assert process.poll() is None, "straw run exited"
        assert time.monotonic() < deadline, f"only {_stream_length(redis_url, stream)} of {length} delivered"
        time.sleep(0.1)


def _prove(
    url: str, tmp_path: Path, redis_url: str, stream: str, budget: int, source: dict[str, Any] | None = None,
    **database: Any,
) -> None:
    _fill(url, TABLES)
    path = _config(tmp_path, url, redis_url, stream, TABLES, source, **database)
    with Sampler(url) as sampler:
        result = Runner(load_config(path)).run(once=True, wait=20)
    assert result.errors == []
    assert result.rows_read == TABLES * ROWS
    assert _stream_length(redis_url, stream) == TABLES * ROWS
    assert sampler.refused == []
    assert sampler.samples > 0 and 1 <= sampler.peak <= budget

    _fill(url, TABLES, first_id=ROWS + 1)  # `run` delivers the next rows of every table
    env = {**os.environ, "STRAW_CONFIG": str(path)}
    with Sampler(url) as sampler:
        process = subprocess.Popen([sys.executable, "-m", "straw.cli", "run"], env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _await_length(redis_url, stream, 2 * TABLES * ROWS, process)
            time.sleep(1.0)  # a few more rounds of idle polls, sampled
        finally:
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr.decode()[-2000:]
    assert _stream_length(redis_url, stream) == 2 * TABLES * ROWS
    assert sampler.refused == []
    assert sampler.samples > 0 and 1 <= sampler.peak <= budget


def _private(server: Callable[[int], AbstractContextManager[str]], max_connections: int) -> Iterator[str]:
    """A private server with a low `max_connections`; the test is skipped where its binaries are missing."""
    try:
        with server(max_connections) as url:
            yield url
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture
def small_pg() -> Iterator[str]:
    yield from _private(private_postgres, 20)


@pytest.fixture
def small_mariadb() -> Iterator[str]:
    yield from _private(private_mariadb, 10)


def test_300_sources_on_a_postgresql_with_20_connections(
    small_pg: str, tmp_path: Path, redis_url: str, stream_name: str
) -> None:
    _prove(small_pg, tmp_path, redis_url, stream_name, budget=2)


def test_300_sources_on_a_mariadb_with_10_connections(
    small_mariadb: str, tmp_path: Path, redis_url: str, stream_name: str
) -> None:
    # A settle window, not InnoDB's ledger: the ledger waits 0.2 s in every poll that finds rows (README, "Late
    # commits"), 300 busy sources a minute a round; the connections are what this test is about.
    _prove(small_mariadb, tmp_path, redis_url, stream_name, budget=3, source={"settle_delay": "1s"}, connections=3)


# --- the parts, on the shared services ---


def _spec(url: str, name: str, **extra: Any) -> DbSourceSpec:
    return DbSourceSpec.model_validate({
        "name": name, "url": url, "table": "t000", "mode": "timestamp", "timestamp_column": "changed_at",
        "key_column": "id", "entity": "item", "stream": "s", **extra,
    })


def _open_connections(url: str) -> int:
    """Connections to this scratch database other than the counting one."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )).scalar_one())
    finally:
        engine.dispose()


def _rows(source: DbSource) -> int:
    return sum(len(batch.rows) for batch in source.read(None))


def test_sources_on_one_database_share_one_engine_and_release_it(pg_url: str) -> None:
    _fill(pg_url, 1)
    a, b = (DbSource(_spec(pg_url, n), ["id", "name"]) for n in ("a", "b"))
    other = DbSource(_spec(pg_url + "?application_name=other", "c"), ["id", "name"])
    try:
        assert a.engine is b.engine and other.engine is not a.engine
        assert len(list(a.read(None))) == len(list(b.read(None))) == 1
        assert _open_connections(pg_url) == 1  # one kept between polls, for both sources
    finally:
        for source in (a, b, other):
            source.close()
    assert _open_connections(pg_url) == 0
    assert all(d.spec.url not in (pg_url,) for d in DATABASES.all())


def test_polls_that_overlapped_leave_one_connection_kept(pg_url: str) -> None:
    """The connection kept between polls rests outside the pool: a second one, returned while it rests,
    is closed, not kept by the pool too."""
    _fill(pg_url, 1)
    a, b = (DbSource(_spec(pg_url, n), ["id", "name"]) for n in ("a", "b"))
    try:
        assert _rows(a) == ROWS
        with a.connect() as held:
            assert _rows(b) == ROWS  # on a second connection, within the budget of 2
            assert _open_connections(pg_url) == 2
            held.execute(text("SELECT 1"))
        assert _open_connections(pg_url) == 1
        assert _rows(a) == ROWS and _open_connections(pg_url) == 1
    finally:
        for source in (a, b):
            source.close()
    assert _open_connections(pg_url) == 0


def test_idle_connections_zero_and_idle_timeout_close_what_is_kept(pg_url: str) -> None:
    _fill(pg_url, 1)
    none_kept = DbSource(_spec(pg_url, "a"), ["id"], database=DatabaseSpec(url=pg_url, idle_connections=0))
    try:
        list(none_kept.read(None))
        assert _open_connections(pg_url) == 0
    finally:
        none_kept.close()
    kept = DbSource(_spec(pg_url, "b"), ["id"], database=DatabaseSpec(url=pg_url, idle_timeout=30))
    try:
        list(kept.read(None))
        assert _open_connections(pg_url) == 1
        DATABASES.trim(time.monotonic() + 10)  # not yet idle long enough
        assert _open_connections(pg_url) == 1
        DATABASES.trim(time.monotonic() + 31)
        assert _open_connections(pg_url) == 0
        assert _rows(kept) == ROWS  # and the next poll reconnects
    finally:
        kept.close()


def test_each_source_keeps_its_own_statement_timeout_on_a_shared_connection(pg_url: str) -> None:
    _fill(pg_url, 1)
    slow = "SELECT id, name, changed_at FROM t000 WHERE pg_sleep(0.5) IS NOT NULL"
    # settle off: a transaction of another test's database must not hold the one read this test makes.
    strict = DbSource(_spec(pg_url, "strict", table=None, query=slow, statement_timeout="100ms", settle="off"),
                      ["id"])
    patient = DbSource(_spec(pg_url, "patient", table=None, query=slow, settle="off"), ["id"])
    try:
        assert strict.engine is patient.engine
        assert _rows(patient) == ROWS
        with pytest.raises(Exception, match="statement timeout"):
            list(strict.read(None))
        assert _rows(patient) == ROWS  # the same connection, its limit lifted again
    finally:
        strict.close()
        patient.close()


def test_the_gate_serves_waiters_in_arrival_order() -> None:
    gate = Gate(1)
    gate.acquire()
    served: list[int] = []
    threads = []
    for number in range(5):
        def wait(n: int = number) -> None:
            gate.acquire()
            served.append(n)
            gate.release()
        thread = threading.Thread(target=wait)
        thread.start()
        threads.append(thread)
        while len(gate._waiters) < number + 1:  # each one queued before the next arrives
            time.sleep(0.001)
    gate.release()
    for thread in threads:
        thread.join()
    assert served == [0, 1, 2, 3, 4]
    assert gate.in_use == 0


def _write(tmp_path: Path, url: str, databases: list[dict[str, Any]]) -> Path:
    path = _config(tmp_path, url, "redis://127.0.0.1:6379/0", "s", 2)
    config = yaml.safe_load(path.read_text())
    config["databases"] = databases
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_a_databases_entry_for_no_source_is_a_config_error_without_the_url(tmp_path: Path) -> None:
    url = "postgresql+psycopg://erp:s3cret@127.0.0.1:5432/erp"
    path = _write(tmp_path, url, [{"url": url.replace("erp", "epr", 1), "connections": 4}])
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value.problems[0])
    assert "databases" in message and "no database source has this `url`" in message
    assert f"{path}:" in message and "s3cret" not in message
    config = load_config(_write(tmp_path, url, [{"url": url, "connections": 4, "idle_connections": 0}]))
    assert config.database(url).connections == 4 and config.database("sqlite://").connections == 2


def test_check_reports_the_budget_and_warns_above_a_tenth_of_max_connections(
    small_pg: str, tmp_path: Path
) -> None:
    _fill(small_pg, 2)
    ok = invoke("check", "--config", str(_write(tmp_path, small_pg, [])))
    assert "budget 2 connections, 1 kept idle for 60s of the server's max_connections 20" in ok.output
    too_many = invoke("check", "--config", str(_write(tmp_path, small_pg, [{"url": small_pg, "connections": 5}])))
    assert "warn" in too_many.output and "more than 10% of the server's max_connections 20" in too_many.output
    assert "lower `connections`" in too_many.output


def _kill_others(url: str) -> int:
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            return int(conn.execute(text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )).scalar_one())
    finally:
        engine.dispose()


def test_a_kept_connection_that_died_while_resting_is_replaced_before_the_poll(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No ping on a connection returned a moment ago (a busy pool's idle polls); one that rested is pinged."""
    import adapters.db.engine

    _fill(pg_url, 1)
    source = DbSource(_spec(pg_url, "a"), ["id"])
    try:
        list(source.read(None))
        monkeypatch.setattr(adapters.db.engine, "PING_AFTER", 0.0)
        assert _kill_others(pg_url) == 1  # the kept connection dies (a server restart, a firewall)
        time.sleep(0.05)
        assert _rows(source) == ROWS
    finally:
        source.close()


def test_status_lists_errors_first_and_filters_by_state(tmp_path: Path, redis_url: str) -> None:
    from outbox.store import Outbox

    path = _config(tmp_path, "sqlite:///unused.db", redis_url, "s", 4)  # t000 … t003
    outbox = Outbox(tmp_path / "outbox.db")
    outbox.polled("t000")
    outbox.polled("t002", error="OperationalError: server closed the connection")
    outbox.polled("t003")
    outbox.close()
    def listed(*options: str) -> list[str]:
        output = invoke("status", "--config", str(path), *options).output
        return [line.split("│")[1].strip() for line in output.splitlines()
                if line.startswith("│") and line.split("│")[1].strip().startswith("t0")]

    assert listed() == ["t002", "t001", "t000", "t003"]  # error, never polled, ok…
    assert listed("--state", "error") == ["t002"]
    assert listed("--state", "ok") == ["t000", "t003"]
    assert listed("--sort", "name") == ["t000", "t001", "t002", "t003"]
    title = invoke("status", "--config", str(path), "--state", "error").output
    assert "4: 1 error, 1 new, 2 ok; showing 1 error" in title


def test_odbc_sources_on_one_database_share_its_pool_and_budget(pg_url: str) -> None:
    from sqlalchemy.engine import make_url

    _fill(pg_url, 1)
    url = make_url(pg_url)
    odbc = (f"odbc:Driver={{PostgreSQL Unicode}};Server={url.host};Port={url.port or 5432};"
            f"Database={url.database};UID={url.username};")
    budget = DatabaseSpec(url=odbc, connections=1)
    a, b = (DbSource(_spec(odbc, n), ["id", "name"], database=budget) for n in ("a", "b"))
    try:
        assert a.engine is b.engine and a.database.gate.slots == 1
        assert _rows(a) == _rows(b) == ROWS
        assert _open_connections(pg_url) == 1
    finally:
        a.close()
        b.close()
    assert _open_connections(pg_url) == 0


def test_the_status_page_and_json_filter_and_sort_like_straw_status(tmp_path: Path, redis_url: str) -> None:
    """300 sources: the page and /status.json take ?state= and ?sort= as `straw status` takes --state/--sort."""
    from wsgiref.util import setup_testing_defaults

    import lxml.html
    import orjson

    from outbox.store import Outbox
    from straw.metrics import Metrics
    from straw.web import make_app

    config = load_config(_config(tmp_path, "sqlite:///unused.db", redis_url, "s", 300))
    outbox = Outbox(config.outbox.path)
    for t in range(0, 300, 3):
        outbox.polled(f"t{t:03d}")
    outbox.polled("t151", error="OperationalError: server closed the connection")
    outbox.close()
    app = make_app(config, Metrics(config.outbox.path, [s.name for s in config.sources], config.streams))

    def get(path: str, query: str = "") -> tuple[str, bytes]:
        environ: dict[str, Any] = {"PATH_INFO": path, "QUERY_STRING": query}
        setup_testing_defaults(environ)
        answer: list[str] = []
        body = b"".join(app(environ, lambda status, _headers, *_: answer.append(status)))  # type: ignore[arg-type]
        return answer[0], body

    def names(query: str) -> list[str]:
        status, body = get("/status.json", query)
        assert status.startswith("200")
        return [s["source"] for s in orjson.loads(body)["sources"]]

    everything = names("")
    assert len(everything) == 300 and everything[0] == "t151"  # errors first
    assert names("state=error") == ["t151"]
    assert len(names("state=ok")) == 100 and len(names("state=new")) == 199
    assert names("sort=name") == sorted(everything)
    assert len(names("state=nonsense")) == 300  # an unknown value is the default, never a 500
    status, page = get("/", "state=error&sort=name")
    assert status.startswith("200")
    tree = lxml.html.fromstring(page)
    assert [r.get("data-source") for r in tree.xpath("//table[@id='sources']//tr[@data-source]")] == ["t151"]
    summary = tree.xpath("//p[@id='summary']")[0].text_content()
    assert "300 sources: 1 error, 199 new, 100 ok" in summary
    assert tree.xpath("//p[@id='filters']//a[@href='?state=error']")
