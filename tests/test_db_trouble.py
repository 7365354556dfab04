"""Behaviour under trouble: a connection killed mid-read, schema drift, statements that run too long."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, insert, text
from sqlalchemy.engine import make_url

from adapters.db.poller import SchemaDrift
from bus.redis import RedisBus
from fixtures.legacy_orders import create_orders, order_rows
from outbox.relay import adopt_streams
from outbox.store import Outbox
from straw.config_load import load_config
from straw.runner import Pipeline, Runner, RunResult, build_pipeline, poll
from straw.source import RawBatch, Source
from tests.conftest import PG_ADMIN_URL
from tests.helpers import orders_config, run_once
from tests.test_cli import invoke


class KillAfterFirstBatch:
    """The real source; once its first batch is handed out, the database kills its connection."""

    def __init__(self, source: Source, kill: str) -> None:
        self.inner, self.kill, self.name = source, kill, source.name

    def read(self, after: str | None, limit: int | None = None) -> Iterator[RawBatch]:
        batches = self.inner.read(after, limit)
        yield next(batches)
        admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            killed = conn.execute(
                text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                     "WHERE datname = :db AND pid <> pg_backend_pid()"),
                {"db": self.kill},
            ).scalar_one()
        admin.dispose()
        assert killed >= 1
        yield from batches

    def restore(self, memo: str | None) -> None:
        self.inner.restore(memo)

    def check(self) -> str:
        return self.inner.check()

    def close(self) -> None:
        self.inner.close()


def test_connection_killed_mid_read_keeps_the_batch_out_and_retries(
    tmp_path: Path, pg_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    engine = create_engine(pg_url)
    create_orders(engine, 50)
    engine.dispose()
    path = orders_config(tmp_path, db_url=pg_url, redis_url=redis_url, stream=stream_name, batch_size=10,
                         poll_interval=60)
    config = load_config(path)
    pipeline: Pipeline = build_pipeline(config, config.sources[0])
    pipeline.source = KillAfterFirstBatch(pipeline.source, str(make_url(pg_url).database))
    outbox = Outbox(config.outbox.path)
    runner = Runner(config)
    try:
        adopt_streams(RedisBus(redis_client), outbox, [stream_name])
        result = RunResult()
        assert runner._poll_logged(pipeline, outbox, result) == 0
        assert len(result.errors) == 1 and "terminat" in result.errors[0]
        assert outbox.position("orders") == "[10]"  # the first batch only; the one being read is not in
        assert outbox.backlog() == 10
        assert pipeline.failures == 1 and pipeline.next_due - time.monotonic() > 60  # backs off
        status = invoke("status", "--config", str(path))
        assert "terminat" in status.output and "[10]" in status.output

        pipeline.source = pipeline.source.inner  # type: ignore[attr-defined]
        assert poll(pipeline, outbox) == 40  # the retry reconnects and resumes after the first batch
        assert outbox.position("orders") == "[50]"
        assert outbox.sources()[0].error is None
    finally:
        outbox.close()
        pipeline.source.close()
    assert run_once(path).errors == []
    subjects = [fields[b"event"] for _id, fields in redis_client.xrange(stream_name)]
    assert len(subjects) == 50


def test_schema_drift_names_source_column_and_fix_and_advances_nothing(
    tmp_path: Path, db_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    engine = create_engine(db_url)
    table = create_orders(engine, 5)
    path = orders_config(tmp_path, db_url=db_url, redis_url=redis_url, stream=stream_name)
    config = load_config(path)
    pipeline = build_pipeline(config, config.sources[0])
    outbox = Outbox(config.outbox.path)
    q = engine.dialect.identifier_preparer.quote
    try:
        adopt_streams(RedisBus(redis_client), outbox, [stream_name])
        assert poll(pipeline, outbox) == 5
        with engine.begin() as conn:
            conn.execute(insert(table), order_rows(3, first=6))
            conn.execute(text(f"ALTER TABLE {q('ORDERS')} RENAME COLUMN {q('NOTE')} TO {q('REMARK')}"))
        # The running source has the old table in hand: its read fails, and says why.
        drift = r"source 'orders': table 'ORDERS' has no column 'NOTE'.*REMARK.*fix `mapping`"
        with pytest.raises(SchemaDrift, match=drift):
            poll(pipeline, outbox)
        assert outbox.position("orders") == "[5]" and outbox.backlog() == 5
    finally:
        outbox.close()
        pipeline.source.close()
    result = run_once(path)
    assert result.rows_read == 0
    assert any("no column 'NOTE'" in e for e in result.errors)
    engine.dispose()


SLOW_QUERY = {
    "postgresql": 'SELECT o.* FROM "ORDERS" o, (SELECT pg_sleep(30)) s',
    "mysql": "SELECT o.* FROM `ORDERS` o, (SELECT SLEEP(30) AS z) s",
    "sqlite": 'SELECT o.* FROM "ORDERS" o WHERE (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL '
              'SELECT x + 1 FROM c WHERE x < 500000000) SELECT count(*) FROM c) > 0',
}


def test_statement_timeout_stops_a_slow_read(
    tmp_path: Path, db_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    engine = create_engine(db_url)
    create_orders(engine, 3)
    path = orders_config(
        tmp_path, db_url=db_url, redis_url=redis_url, stream=stream_name, mode="snapshot", timestamp_column=None,
        key_column=None, table=None, query=SLOW_QUERY[engine.dialect.name], statement_timeout="200ms",
    )
    result = run_once(path)
    assert result.rows_read == 0
    assert len(result.errors) == 1
    assert any(word in result.errors[0] for word in ("statement timeout", "max_statement_time", "interrupted"))
    engine.dispose()
