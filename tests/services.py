"""Say which real services the tests will use, before they run: one line each."""

from __future__ import annotations

import asyncio
import os

import redis
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from bus.rabbitmq import RabbitStreamBus
from bus.seam import BusDown, BusRefused
from straw.local_redis import redis_server_binary
from tests.conftest import MARIADB_ADMIN_URL, PG_ADMIN_URL, RABBITMQ_STREAM_URL


def _sql(url: str) -> str | None:
    engine = create_engine(url, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            return str(conn.execute(text("SELECT version()")).scalar())
    except Exception as exc:
        return f"MISSING ({type(exc).__name__})"
    finally:
        engine.dispose()


def _nats() -> str:
    from fixtures.private_nats import nats_server_binary
    from tests.nats_support import NATS_URL, _alive

    if asyncio.run(_alive(NATS_URL)):
        return f"nats: {NATS_URL} (JetStream)"
    binary = nats_server_binary()
    return (f"nats: {NATS_URL} not reachable; tests start a private server from {binary}" if binary else
            f"nats: MISSING: no JetStream at {NATS_URL} and no nats-server binary; its tests are skipped")


def main() -> None:
    url = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1)
        line = f"redis: {url} (version {client.info('server')['redis_version']})"
        client.close()
    except redis.RedisError:
        binary = redis_server_binary()
        line = f"redis: {url} not reachable; tests start a private server from {binary}" if binary else (
            "redis: MISSING: no server at {url} and no redis-server binary; install redis-server")
    print(line)
    print(_nats())
    for name, admin, hint in (
        ("postgresql", PG_ADMIN_URL, "set STRAW_TEST_PG_URL or start PostgreSQL; its tests are skipped"),
        ("mariadb", MARIADB_ADMIN_URL, "set STRAW_TEST_MARIADB_URL or start MariaDB; its tests are skipped"),
    ):
        found = _sql(admin)
        shown = make_url(admin).render_as_string(hide_password=True)
        print(f"{name}: {shown} {found}" + (f" -> {hint}" if found and found.startswith("MISSING") else ""))
    print(_rabbitmq())


def _rabbitmq() -> str:
    bus = RabbitStreamBus(RABBITMQ_STREAM_URL, socket_timeout=3.0)
    try:
        return f"rabbitmq streams: {RABBITMQ_STREAM_URL} ({bus.describe()[1]})"
    except (BusDown, BusRefused) as exc:
        return f"rabbitmq streams: MISSING ({exc}) -> its tests are skipped"
    finally:
        bus.close()


if __name__ == "__main__":
    main()
