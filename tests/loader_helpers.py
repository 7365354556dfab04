"""Helpers of the loader tests: a stream filled as the relay fills it, and a config with a loader."""

from __future__ import annotations

import datetime as dt
import random
import subprocess
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import redis
import yaml

from fixtures.legacy_orders import ORDER_ENTITY
from straw.records import encode_event, source_uri
from tests.crashes import REPO, kill_hard, straw_command, tail

SOURCE = source_uri("test", "orders")


def order_data(number: int, amount: str = "10.00", status: str = "NEW", note: str | None = None) -> dict[str, Any]:
    return {
        "order_no": number, "customer": "Café Ørsted", "amount": amount, "currency": "EUR",
        "order_date": "2026-11-01", "status": status, "paid": False, "note": note,
        "changed_at": dt.datetime(2026, 11, 1, 9, 30, tzinfo=dt.timezone(dt.timedelta(hours=1))).isoformat(),
    }


def xadd_events(client: redis.Redis, stream: str, changes: list[tuple[str, dict[str, Any]]], first_seq: int = 1) -> int:
    """Append (op, data) changes as the relay does (fields seq, pos, event); return the last seq."""
    seq = first_seq - 1
    pipe = client.pipeline(transaction=False)
    for op, data in changes:
        seq += 1
        event = encode_event(source=SOURCE, entity="order", op=op, key=str(data["order_no"]),
                             position=f"[{seq}]", time="2026-11-29T10:00:00Z", data=data)
        pipe.xadd(stream, {"seq": seq, "pos": f"[{seq}]", "event": event})
    pipe.execute()
    return seq


def loader_config(directory: Path, redis_url: str, loaders: list[dict[str, Any]], stream: str = "s") -> Path:
    config = {
        "instance": "test",
        "redis": {"url": redis_url},
        "outbox": {"path": str(directory / "outbox.db")},
        "entities": {"order": ORDER_ENTITY},
        "sources": [{"name": "orders", "url": f"sqlite:///{directory / 'legacy.db'}", "table": "ORDERS",
                     "mode": "incrementing", "incrementing_column": "ORDER_NO", "entity": "order",
                     "stream": stream}],
        "loaders": loaders,
    }
    path = directory / "straw.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def money(text: str) -> Decimal:
    return Decimal(text)


def jsonl_seqs(directory: Path) -> list[int]:
    """The seqs in the loader's files, complete lines only (a kill may leave a torn last one)."""
    seqs: list[int] = []
    for path in sorted(directory.glob("*.jsonl*"), key=lambda p: p.name.lstrip(".")):
        seqs += [orjson.loads(line)["strawseq"] for line in path.read_bytes().split(b"\n")[:-1]]
    return seqs


def written(directory: Path) -> int:
    """Complete lines on disk: counted, not parsed, so a kill lands close to the moment asked for."""
    if not directory.exists():
        return 0
    total = 0
    for path in directory.glob("*.jsonl*"):
        try:
            total += path.read_bytes().count(b"\n")
        except FileNotFoundError:  # renamed when closed between the glob and the read: counted under its new name
            return written(directory)
    return total


def load_then_kill(config: Path, directory: Path, log: Path, lines: int, total: int, *args: str) -> None:
    """`straw load jl` until it wrote `lines` more lines to `directory` (or all `total` records), then SIGKILL
    (its group). A loader that makes no progress for 60 s while records remain fails the test: liveness is a
    promise too."""
    with log.open("ab") as out:
        loader = subprocess.Popen(straw_command(config, "load", "jl", *args), cwd=REPO, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    # Bounded by the stream: a run that already wrote the last record has nothing more to write (the
    # kills overshoot by whatever the loader writes between two looks; session 12 took that for a stall).
    target = min(written(directory) + lines, total)
    last, deadline = -1, 0.0
    try:
        while (now := written(directory)) < target:
            assert loader.poll() is None, tail(log)  # a loader that exits by itself fails the test
            if now != last:
                last, deadline = now, time.monotonic() + 60  # start-up alone takes seconds on a loaded machine
            assert time.monotonic() < deadline, f"no progress in 60 s at {now} of {total} lines: {tail(log)}"
            time.sleep(0.01)
        time.sleep(random.random() * 0.05)
    finally:
        kill_hard(loader, whole_group=True)
