"""Real services for the tests: Redis, PostgreSQL and MariaDB on loopback.

Each test gets its own database and its own stream names; everything it
creates is removed afterwards. Where a service is missing, the tests that need
it are skipped with a message that says what is missing and how to provide it
(Redis is never missing: a private redis-server is started instead).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from filelock import ReadWriteLock
from hypothesis import settings
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from bus.rabbitmq import RabbitStreamBus
from bus.seam import BusDown, BusRefused
from fixtures.private_rabbitmq import PrivateRabbit, start_private_rabbitmq
from fixtures.private_rabbitmq import available as private_rabbitmq_missing
from straw.local_redis import RedisServer, redis_alive, start_private_redis
from tests.lazy_server import lazy_server

# --- Which tests run alone -----------------------------------------------------------------------------------------
# scripts/test.sh runs the suite on several xdist workers (`-n 4 --dist loadgroup -m "not alone"`): most tests
# wait on services and sleeps, so they share two cores well. The tests below do not. Each lane is an xdist group
# that one worker runs one test after another, so two tests of a lane never overlap:
# - timing: tests that race a settle window or need MariaDB's server-wide open transactions (which its settle
#   ledger reads) to be their own, or stop a relay child;
# - kills, loader-kills: tests that SIGKILL or stop straw processes and private servers. Each has its own
#   processes, servers, ports, tables and streams, so the two lanes share nothing but the CPU; they are two
#   lanes, not one, because together they take longer than the rest of the suite.
# - alone: tests whose deadlines assume the CPU to themselves (lease TTLs of a second, a stop within 5 s,
#   300 sources delivered within a minute); scripts/test.sh runs them after the others, without xdist
#   (`-m alone`). Under xdist they still form one lane.
# One list here, so the test files (which other work edits) need no marker lines.
SERIAL_MODULES = {
    "test_db_budget": "alone",  # 300 sources on a private server's few connections, delivered within 60 s
    "test_db_commit_safe": "timing",  # late commits against a settle window of seconds; holds MariaDB open
    "test_db_idle_probe": "timing",  # one next poll must see a row: no other MariaDB transaction may be open
    "test_db_query_settle": "timing",
    "test_lease": "alone",  # lease failover: takeovers within a lease's second
    "test_lease_keyed": "alone",
    "test_relay_stop": "timing",
    "test_stop": "alone",  # SIGTERM of a million-row poll must stop within 5 s
    "test_bus_rollback": "kills",  # private Redis primary/replica, stopped and promoted
    "test_crash": "kills",  # SIGKILL of `straw run` at random moments
    "test_db_snapshot_crash": "kills",
    "test_nats_crash": "kills",
    "test_nats_outage": "kills",  # a private nats-server stopped and restarted
    "test_rabbitmq_crash": "kills",
    "test_rabbitmq_outage": "kills",  # a private RabbitMQ node stopped for a minute
    "test_redis_outage": "kills",
    "test_loader_kill": "loader-kills",  # loaders SIGKILLed mid-batch, per bus
    "test_loader_rollback": "loader-kills",
}
SERIAL_TESTS = {  # module::function, in modules whose other tests may run beside anything
    "test_db_key_sweep::test_kill_9_during_key_sweeps_loses_and_repeats_no_delete": "kills",
    "test_loader_buses::test_a_nats_outage_mid_load_is_waited_out_and_nothing_is_lost_or_doubled": "loader-kills",
    "test_loader_buses::test_a_rabbitmq_outage_mid_load_is_waited_out_and_nothing_is_lost_or_doubled":
        "loader-kills",
    "test_loader_pipelined::test_a_jsonl_loader_killed_at_random_acks_only_what_it_wrote_and_ends_exact":
        "loader-kills",
    "test_loader_buses::test_a_jsonl_loader_killed_at_random_writes_each_record_once_and_in_order": "loader-kills",
}


def serial_lane(nodeid: str) -> str | None:
    """The lane of the test of `nodeid` ('tests/test_x.py::test_y[param]'), or None: it may run beside anything."""
    path, _, name = nodeid.partition("::")
    module = Path(path).stem
    return SERIAL_MODULES.get(module) or SERIAL_TESTS.get(f"{module}::{name.partition('[')[0]}")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        lane = serial_lane(item.nodeid)
        if lane is not None:
            item.add_marker(pytest.mark.serial)  # `-m serial` / `-m 'not serial'` select them
            if lane == "alone":
                item.add_marker(pytest.mark.alone)
        elif item.get_closest_marker("slow") is not None:
            item.warn(pytest.PytestWarning("a slow test that may run beside the others: add it to "
                                           "tests/conftest.py SERIAL_TESTS unless it neither kills, stops nor times"))


@pytest.hookimpl(optionalhook=True)  # an xdist hook: pytest without xdist knows no such hook
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`--dist loadgroup`, with each lane one group.

    xdist 3.6-3.8 honour the `xdist_group` marker by setting an item's `_nodeid`, which pytest 9 no longer
    reads (the marker is silently ignored), so the group is decided here, on the controller, from the node id.
    """
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class LaneScheduling(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return serial_lane(nodeid) or super()._split_scope(nodeid)

    return LaneScheduling(config, log)


# No per-example deadline: on a loaded CI machine a slow example is not a failure (hypothesis would call it one).
settings.register_profile("straw", deadline=None)
settings.load_profile("straw")


# xdist's workers start with COLUMNS=80 in their environment, and a rich Console takes its width from COLUMNS
# once, when it is made (straw.cli's, at import): the CLI tests' own COLUMNS=400 would then be ignored.
os.environ.pop("COLUMNS", None)


PG_ADMIN_URL = os.environ.get("STRAW_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
MARIADB_ADMIN_URL = os.environ.get("STRAW_TEST_MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306/")


@pytest.fixture(scope="session")
def private_redis_for_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], str]]:
    """A private redis-server of this worker, started the first time a test finds no machine server."""
    yield from lazy_server(lambda: start_private_redis(tmp_path_factory.mktemp("redis"), persist=False))


@pytest.fixture
def redis_url(private_redis_for_session: Callable[[], str]) -> str:
    """REDIS_URL if set, else the local 6379, else a private redis-server.

    Asked per test (a PING): a machine server that goes away in the middle of a run costs the tests that were
    using it, not every later one.
    """
    for url in (os.environ.get("REDIS_URL"), "redis://127.0.0.1:6379/0"):
        if url and redis_alive(url):
            return url
    return private_redis_for_session()


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def stream_name(redis_client: redis.Redis) -> Iterator[str]:
    """A stream name of this test alone; the stream and its checkpoint are deleted afterwards."""
    name = f"test.{uuid.uuid4().hex[:12]}.orders"
    yield name
    for key in redis_client.scan_iter(match=f"*{name}*"):
        redis_client.delete(key)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test alone, which it may stop, kill and restart (append-only, fsync always)."""
    server = start_private_redis(tmp_path / "redis", persist=True)
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'legacy.db'}"


def _scratch_database(admin_url: str, service: str, hint: str, options: str = "") -> Iterator[str]:
    """A database of its own for one test; `options`: what follows CREATE DATABASE name."""
    name = f"straw_t_{uuid.uuid4().hex[:10]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f"CREATE DATABASE {name} {options}"))
    except Exception as exc:  # the service is missing or refuses: say which and how to fix
        admin.dispose()
        pytest.skip(f"{service} not reachable at {make_url(admin_url).render_as_string()}: "
                    f"{type(exc).__name__}; {hint}")
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            if service == "PostgreSQL":
                conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            else:
                conn.execute(text(f"DROP DATABASE IF EXISTS {name}"))
        admin.dispose()


@pytest.fixture
def pg_url() -> Iterator[str]:
    yield from _scratch_database(
        PG_ADMIN_URL, "PostgreSQL", "start PostgreSQL on 127.0.0.1:5432 (trust auth) or set STRAW_TEST_PG_URL"
    )


@pytest.fixture
def sql_ascii_pg_url() -> Iterator[str]:
    """A PostgreSQL database created SQL_ASCII, as old installations were: it keeps any bytes it is sent."""
    yield from _scratch_database(
        PG_ADMIN_URL, "PostgreSQL", "start PostgreSQL on 127.0.0.1:5432 (trust auth) or set STRAW_TEST_PG_URL",
        "ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0",
    )


# MariaDB's settle ledger reads the server's open write transactions (information_schema.innodb_trx), every
# database's: a poll holds back new rows while any is open, and `run --once` then ends without them. These modules
# keep MariaDB transactions open for seconds on purpose, so while one of their tests runs no other MariaDB test
# may (a write turn); the other MariaDB tests share a read turn, as their transactions last milliseconds.
MARIADB_ALONE = frozenset({"test_db_commit_safe", "test_db_idle_probe", "test_db_query_settle"})


@pytest.fixture(scope="session")
def mariadb_turns(tmp_path_factory: pytest.TempPathFactory) -> ReadWriteLock:
    """One lock for this run's xdist workers: their base temp directories share a parent; alone, its own."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    return ReadWriteLock(shared / "mariadb-turns.db", is_singleton=False)


@pytest.fixture
def mariadb_url(request: pytest.FixtureRequest, mariadb_turns: ReadWriteLock) -> Iterator[str]:
    alone = Path(request.node.path).stem in MARIADB_ALONE
    with mariadb_turns.write_lock() if alone else mariadb_turns.read_lock():
        yield from _scratch_database(
            MARIADB_ADMIN_URL, "MariaDB",
            "start MariaDB on 127.0.0.1:3306 (root, no password) or set STRAW_TEST_MARIADB_URL",
        )


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def db_url(request: pytest.FixtureRequest) -> str:
    """The same test on each legacy database straw supports out of the box."""
    fixture = {"sqlite": "sqlite_url", "postgresql": "pg_url", "mariadb": "mariadb_url"}[request.param]
    return str(request.getfixturevalue(fixture))


# --- RabbitMQ Streams (bus/rabbitmq.py) -------------------------------------------------------------------------

RABBITMQ_STREAM_URL = os.environ.get("STRAW_TEST_RABBITMQ_URL", "rabbitmq-stream://guest:guest@127.0.0.1:5552/")


@pytest.fixture(scope="session")
def rabbitmq_url() -> str:
    """The machine's RabbitMQ stream port; the tests that need it are skipped, saying why, when it is closed."""
    bus = RabbitStreamBus(RABBITMQ_STREAM_URL, socket_timeout=5.0)
    try:
        bus.describe()
    except (BusDown, BusRefused) as exc:
        pytest.skip(f"RabbitMQ Streams not reachable at {RABBITMQ_STREAM_URL} ({exc}); enable the plugin "
                    "(rabbitmq-plugins enable rabbitmq_stream, as scripts/test.sh does as root) or set "
                    "STRAW_TEST_RABBITMQ_URL")
    finally:
        bus.close()
    return RABBITMQ_STREAM_URL


@pytest.fixture
def rabbitmq_bus(rabbitmq_url: str) -> Iterator[RabbitStreamBus]:
    bus = RabbitStreamBus(rabbitmq_url)
    yield bus
    bus.close()


@pytest.fixture
def rabbitmq_stream(rabbitmq_url: str) -> Iterator[str]:
    """A stream name of this test alone; the RabbitMQ stream is deleted afterwards."""
    name = f"test.{uuid.uuid4().hex[:12]}.orders"
    yield name
    bus = RabbitStreamBus(rabbitmq_url)
    try:
        bus.delete_stream(name)
    finally:
        bus.close()


@pytest.fixture
def private_rabbitmq(tmp_path: Path) -> Iterator[PrivateRabbit]:
    """A RabbitMQ node of this test alone (stream plugin on), which it may stop, kill and restart."""
    reason = private_rabbitmq_missing()
    if reason is not None:
        pytest.skip(f"no private RabbitMQ node: {reason}")
    server = start_private_rabbitmq(tmp_path / "rabbitmq")
    try:
        yield server
    finally:
        server.kill()
