"""The legacy side of a benchmark: the fixture ORDERS table in SQLite or PostgreSQL."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine

from bench.services import Bench, log, postgres_database
from fixtures.legacy_orders import create_orders


def fill(url: str, rows: int) -> None:
    started = time.perf_counter()
    engine = create_engine(url)
    try:
        create_orders(engine, rows)
    finally:
        engine.dispose()
    log(f"legacy ORDERS: {rows} rows written in {time.perf_counter() - started:.1f} s")


@contextmanager
def legacy_database(bench: Bench, backend: str, rows: int) -> Iterator[str]:
    """A URL of a legacy database holding `rows` orders; removed afterwards."""
    if backend == "sqlite":
        url = f"sqlite:///{bench.workdir('legacy') / 'legacy.db'}"
        fill(url, rows)
        yield url  # the file goes with the run's temp dir
    elif backend == "postgresql":
        with postgres_database() as url:
            fill(url, rows)
            yield url
    else:
        raise ValueError(f"unknown legacy backend {backend!r}")
