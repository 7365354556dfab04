"""Loader measures: the SQL loader into PostgreSQL against a hand-written per-row loop, and the JSON Lines loader.

Both read the same stream, filled once as the relay fills it (fields seq, pos, event), each repetition through a
fresh consumer group, so every run reads every record from Redis and applies it.
"""

from __future__ import annotations

import datetime as dt
import statistics
import threading
import time
import uuid
from decimal import Decimal
from typing import Any

from sqlalchemy import create_engine, insert

from bench.services import Bench, log, postgres_database
from loaders import collector
from loaders.jsonl import JsonlLoader
from loaders.redis_consumer import RedisConsumer
from loaders.sdk import Settings, consume
from loaders.service import settings_of
from loaders.sql import SqlLoader
from loaders.sql_schema import entity_table
from straw.config import EntitySpec
from straw.config_loaders import JsonlLoaderSpec, SqlLoaderSpec
from straw.records import Envelope, source_uri

ENTITY: dict[str, Any] = {
    "key": ["order_no"],
    "fields": {"order_no": "integer", "customer": "string", "amount": {"type": "decimal", "scale": 2},
               "status": "string", "paid": "boolean", "changed_at": "datetime"},
}
BATCH = 500


def fill_stream(bench: Bench, records: int) -> str:
    stream = bench.stream("loader")
    envelope = Envelope(source=source_uri("bench", "orders"), entity="order", op="upserted",
                        time="2026-11-29T10:00:00Z")
    pipe = bench.redis.pipeline(transaction=False)
    for seq in range(1, records + 1):
        data = {"order_no": seq, "customer": f"Café Ørsted {seq % 97}", "amount": f"{seq % 100000}.{seq % 100:02d}",
                "status": "SHIPPED", "paid": seq % 2 == 0,
                "changed_at": (dt.datetime(2026, 11, 1, tzinfo=dt.UTC) + dt.timedelta(seconds=seq)).isoformat()}
        pipe.xadd(stream, {"seq": seq, "pos": f"[{seq}]", "event": envelope.encode(str(seq), f"[{seq}]", data)})
        if seq % 5000 == 0:
            pipe.execute()
    pipe.execute()
    return stream


def _group(bench: Bench, stream: str) -> tuple[RedisConsumer, str]:
    group = f"bench-{uuid.uuid4().hex[:6]}"
    return RedisConsumer(bench.redis, [stream], group, "c1", claim_idle=60.0,
                         dead_letters=lambda s: f"{s}.dlq"), group


def _sql_loader_run(bench: Bench, stream: str, url: str, entities: dict[str, EntitySpec],
                    records: int) -> tuple[float, float]:
    """Wall seconds, and this process's CPU µs per record (every thread: the read-ahead one too)."""
    spec = SqlLoaderSpec(name="bench", kind="sql", url=url, streams=[stream], create_tables=True,
                         batch_size=BATCH)
    target = SqlLoader(spec, entities)
    consumer, _ = _group(bench, stream)
    cpu = time.process_time()
    started = time.perf_counter()
    tally = consume(consumer, target.apply, entities, Settings(batch_size=BATCH), once=True)
    seconds = time.perf_counter() - started
    cpu = time.process_time() - cpu
    target.close()
    assert tally.applied == records, tally
    return seconds, cpu / records * 1e6


def _per_row_run(bench: Bench, stream: str, url: str, entity: EntitySpec, records: int) -> float:
    """What a team writes by hand: XREADGROUP, one INSERT (autocommit) and one XACK per record."""
    import orjson
    from sqlalchemy import MetaData

    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    table = entity_table(MetaData(), f"per_row_{uuid.uuid4().hex[:6]}", entity, None)
    table.create(engine)
    group = f"bench-{uuid.uuid4().hex[:6]}"
    bench.redis.xgroup_create(stream, group, id="0")
    statement = insert(table)
    done = 0
    started = time.perf_counter()
    with engine.connect() as conn:
        while True:
            reply: Any = bench.redis.xreadgroup(group, "c1", {stream: ">"}, count=BATCH)
            if not reply:
                break
            for entry_id, fields in reply[0][1]:
                data = orjson.loads(fields[b"event"])["data"]
                data["amount"] = Decimal(data["amount"])
                data["changed_at"] = dt.datetime.fromisoformat(data["changed_at"])
                conn.execute(statement, data)
                bench.redis.xack(stream, group, entry_id)
                done += 1
    seconds = time.perf_counter() - started
    engine.dispose()
    assert done == records
    return seconds


def bare_unnest_seconds(url: str, entity: EntitySpec, records: int) -> float:
    """The server's floor for this data: per 500 rows one `INSERT … SELECT FROM unnest(…) ON CONFLICT` of typed
    arrays and a commit, the rows built before the clock starts; no Redis, no parsing, no versions."""
    import psycopg
    from sqlalchemy import MetaData
    from sqlalchemy.engine import make_url

    table = entity_table(MetaData(), "bare_unnest", entity, None)
    engine = create_engine(url)
    table.create(engine)
    engine.dispose()
    start = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    batches = [[(n, f"Café Ørsted {n % 97}", Decimal(f"{n % 100000}.{n % 100:02d}"), "SHIPPED", n % 2 == 0,
                 start + dt.timedelta(seconds=n)) for n in range(first, min(first + BATCH, records + 1))]
               for first in range(1, records + 1, BATCH)]
    columns = list(zip(*batches[0], strict=True))
    assert len(columns) == len(ENTITY["fields"])
    sql = ("INSERT INTO bare_unnest (order_no, customer, amount, status, paid, changed_at) "
           "SELECT * FROM unnest(%s::bigint[], %s::text[], %s::numeric[], %s::text[], %s::boolean[], "
           "%s::timestamptz[]) ON CONFLICT (order_no) DO UPDATE SET customer = EXCLUDED.customer, "
           "amount = EXCLUDED.amount, status = EXCLUDED.status, paid = EXCLUDED.paid, changed_at = EXCLUDED.changed_at")
    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn) as conn:
        started = time.perf_counter()
        for batch in batches:
            conn.execute(sql, [list(c) for c in zip(*batch, strict=True)])
            conn.commit()
        return time.perf_counter() - started


def sql_postgres(bench: Bench, records: int, repeat: int) -> dict[str, Any]:
    entities = {"order": EntitySpec.model_validate(ENTITY)}
    stream = fill_stream(bench, records)
    collector.settle()  # as `straw load` does once started (loaders/service.py)
    loader_s: list[float] = []
    naive_s: list[float] = []
    cpu_us: list[float] = []
    for rep in range(repeat):
        with postgres_database() as url:
            bare = bare_unnest_seconds(url, entities["order"], records)
            log(f"loader sql postgres rep {rep}: bare INSERT … SELECT FROM unnest, 500 rows a commit "
                f"(the server's floor): {records / bare:,.0f} rows/s")
            if rep % 2:
                naive_s.append(_per_row_run(bench, stream, url, entities["order"], records))
                seconds, cpu = _sql_loader_run(bench, stream, url, entities, records)
            else:
                seconds, cpu = _sql_loader_run(bench, stream, url, entities, records)
                naive_s.append(_per_row_run(bench, stream, url, entities["order"], records))
            loader_s.append(seconds)
            cpu_us.append(cpu)
        log(f"loader sql postgres rep {rep}: loader {records / loader_s[-1]:,.0f}/s "
            f"(CPU {cpu:.1f} µs a record: {1e6 / cpu:,.0f} records/s a core), per-row {records / naive_s[-1]:,.0f}/s")
    return {"measure": "loader_sql_postgres_records_per_s", "unit": "records/s",
            "value": statistics.median(records / s for s in loader_s),
            "baseline": "per_row_insert", "baseline_value": statistics.median(records / s for s in naive_s)}


def consumer_only_seconds(bench: Bench, stream: str, entities: dict[str, EntitySpec], records: int,
                          *, typed: bool) -> float:
    """The loaders' floor in this process: the consumer draining a fresh group (XREADGROUP 500 at a time, XACK),
    with `typed` each entry also parsed into a typed Record; nothing applied."""
    from loaders.records import parse

    consumer, _ = _group(bench, stream)
    done = 0
    started = time.perf_counter()
    while deliveries := consumer.read(BATCH, 0):
        if typed:
            for delivery in deliveries:
                parse(delivery, entities)
        consumer.ack(deliveries)
        done += len(deliveries)
    seconds = time.perf_counter() - started
    assert done == records
    return seconds


def jsonl(bench: Bench, records: int, repeat: int) -> dict[str, Any]:
    entities = {"order": EntitySpec.model_validate(ENTITY)}
    stream = fill_stream(bench, records)
    collector.settle()  # as `straw load` does once started (loaders/service.py)
    rates = []
    for rep in range(repeat):
        directory = bench.workdir("jsonl")
        spec = JsonlLoaderSpec(name="bench", kind="jsonl", streams=[stream], directory=directory, batch_size=BATCH)
        loader = JsonlLoader(spec)
        consumer, _ = _group(bench, stream)
        cpu = time.process_time()
        started = time.perf_counter()
        # The settings `straw load` gives this loader (its read ahead included).
        tally = consume(consumer, loader.apply, entities, settings_of(spec), once=True, stop=threading.Event())
        loader.close()
        seconds = time.perf_counter() - started
        cpu_us = (time.process_time() - cpu) / records * 1e6  # every thread of the process: read ahead too
        assert tally.applied == records
        rates.append(records / seconds)
        bare = consumer_only_seconds(bench, stream, entities, records, typed=False)
        typed = consumer_only_seconds(bench, stream, entities, records, typed=True)
        log(f"loader jsonl rep {rep}: {rates[-1]:,.0f} records/s (CPU {cpu_us:.1f} µs a record: "
            f"{1e6 / cpu_us:,.0f} records/s a core); the floor in this process: XREADGROUP + XACK "
            f"alone {records / bare:,.0f}/s, with parse into typed records {records / typed:,.0f}/s")
    return {"measure": "loader_jsonl_records_per_s", "unit": "records/s", "value": statistics.median(rates)}
