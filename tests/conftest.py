"""Real services for the tests: Redis, PostgreSQL and MariaDB on loopback.

Each test gets its own database and its own stream names; everything it
creates is removed afterwards. Where a service is missing, the tests that need
it are skipped with a message that says what is missing and how to provide it
(Redis is never missing: a private redis-server is started instead).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from bus.rabbitmq import RabbitStreamBus
from bus.seam import BusDown, BusRefused
from fixtures.private_rabbitmq import PrivateRabbit, start_private_rabbitmq
from fixtures.private_rabbitmq import available as private_rabbitmq_missing
from straw.local_redis import RedisServer, start_private_redis

PG_ADMIN_URL = os.environ.get("STRAW_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
MARIADB_ADMIN_URL = os.environ.get("STRAW_TEST_MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306/")


def _redis_alive(url: str) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1)
        ok = bool(client.ping())
        client.close()
        return ok
    except redis.RedisError:
        return False


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """REDIS_URL if set, else the local 6379, else a private redis-server for the session."""
    for url in (os.environ.get("REDIS_URL"), "redis://127.0.0.1:6379/0"):
        if url and _redis_alive(url):
            yield url
            return
    server = start_private_redis(tmp_path_factory.mktemp("redis"), persist=False)
    try:
        yield server.url
    finally:
        server.stop()


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


@pytest.fixture
def mariadb_url() -> Iterator[str]:
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
