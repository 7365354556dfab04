"""The real services a benchmark talks to, and the scratch state it must leave behind clean.

Redis: REDIS_URL, else the local 6379, else a private redis-server for the run.
PostgreSQL: a scratch database on the admin URL, dropped afterwards.
Every stream a benchmark names goes through `Bench.stream()`, so it and its
checkpoint are deleted however the run ends.
"""

from __future__ import annotations

import _thread
import faulthandler
import os
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import redis
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from bus.redis import checkpoint_key
from straw.local_redis import redis_alive, start_private_redis

PG_ADMIN_URL = os.environ.get("STRAW_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


class Bench:
    """What one `bench/run.py` invocation owns: a temp dir, a Redis, the streams it created."""

    def __init__(self, stack: ExitStack) -> None:
        self.tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="straw-bench-")))
        self.redis_url = self._choose_redis(stack)
        self.redis = redis.Redis.from_url(self.redis_url)
        stack.callback(self.redis.close)
        self._streams: list[str] = []
        stack.callback(self._drop_streams)
        self._run_id = uuid.uuid4().hex[:8]

    def _choose_redis(self, stack: ExitStack) -> str:
        for url in (os.environ.get("REDIS_URL"), "redis://127.0.0.1:6379/0"):
            if url and redis_alive(url):
                log(f"redis: {safe_url(url)}")
                return url
        server = start_private_redis(self.tmp / "redis", persist=False)
        stack.callback(server.stop)
        log(f"redis: private redis-server at {server.url}")
        return server.url

    def round_trip_us(self, count: int = 2000) -> float:
        """Mean PING round trip. On a VM with idle vCPUs each one waits for a vCPU to wake (~90 µs
        here, against ~20 µs when the cores are busy), which is what bounds the per-row baseline."""
        started = time.perf_counter()
        for _ in range(count):
            self.redis.ping()
        return (time.perf_counter() - started) / count * 1e6

    def stream(self, label: str) -> str:
        """A stream name no one else uses; deleted (with its checkpoint) at the end of the run."""
        name = f"bench.{self._run_id}.{label}.{len(self._streams)}"
        self._streams.append(name)
        return name

    def drop(self, stream: str) -> None:
        self.redis.delete(stream, checkpoint_key(stream))

    def _drop_streams(self) -> None:
        for name in self._streams:
            try:
                self.drop(name)
            except redis.RedisError as exc:
                log(f"could not delete stream {name}: {exc}")

    def workdir(self, label: str) -> Path:
        """A fresh directory under the run's temp dir (outbox files, legacy SQLite databases)."""
        path = self.tmp / f"{label}-{uuid.uuid4().hex[:6]}"
        path.mkdir()
        return path


def safe_url(url: str) -> str:
    """A Redis or database URL without its credentials, for the log."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


@contextmanager
def postgres_database() -> Iterator[str]:
    """A scratch PostgreSQL database for this run; dropped afterwards whatever happens."""
    name = f"straw_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f"CREATE DATABASE {name}"))
        log(f"postgres: scratch database {name} on {safe_url(PG_ADMIN_URL)}")
        try:
            yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as conn:
                conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    finally:
        admin.dispose()


class Watchdog:
    """Interrupts the main thread if `what` hangs: its stacks go to stderr, then Ctrl-C lets every cleanup run."""

    def __init__(self, seconds: float, what: str) -> None:
        self.seconds = seconds
        self.what = what
        self.fired = False
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def _fire(self) -> None:
        self.fired = True
        log(f"{self.what} still running after {self.seconds:.0f} s; its stacks:")
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        _thread.interrupt_main()

    def __enter__(self) -> Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._timer.cancel()
        self._timer.join()  # gone before the next measure starts (bench/run.py lists what a measure left running)
