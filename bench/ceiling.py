"""The Redis client's ceiling on this machine: pipelined XADDs of events exactly like straw's.

The entries are taken from a real straw run (same fields, same event bytes),
so only the cost of sending remains: no database, no mapping, no outbox.
"""

from __future__ import annotations

import itertools
import time
from typing import cast

from bench.services import Bench
from bench.slice_bench import run_straw

Fields = dict[bytes, bytes]


def sample_entries(bench: Bench, db_url: str, rows: int) -> list[Fields]:
    """The stream entries (seq, pos, event) a real straw run writes for `rows` legacy rows."""
    _, stream = run_straw(bench, db_url, rows, keep_stream=True)
    try:
        entries = cast(list[tuple[bytes, Fields]], bench.redis.xrange(stream))
        return [fields for _, fields in entries]
    finally:
        bench.drop(stream)


def prepare(samples: list[Fields], count: int) -> list[Fields]:
    """`count` entries cycling over the samples, each with its own increasing seq, as the relay sends them."""
    return [
        {**fields, b"seq": str(seq).encode()}
        for seq, fields in zip(range(1, count + 1), itertools.cycle(samples), strict=False)
    ]


def xadd_pipelined(bench: Bench, entries: list[Fields], pipeline_size: int = 1000) -> float:
    """Seconds to XADD every entry through pipelines (transaction=False) of `pipeline_size`."""
    stream = bench.stream("ceiling")
    client = bench.redis
    try:
        started = time.perf_counter()
        pipe = client.pipeline(transaction=False)
        for start in range(0, len(entries), pipeline_size):
            for fields in entries[start:start + pipeline_size]:
                pipe.xadd(stream, fields)  # type: ignore[arg-type]
            pipe.execute()
        elapsed = time.perf_counter() - started
        length = client.xlen(stream)
        if length != len(entries):
            raise RuntimeError(f"stream {stream} holds {length} entries, expected {len(entries)}")
    finally:
        bench.drop(stream)
    return elapsed
