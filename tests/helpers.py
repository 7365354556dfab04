"""Small helpers the tests share: write a config, run straw, read a stream back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import redis
import yaml

from fixtures.legacy_orders import ORDER_ENTITY, ORDER_MAPPING
from outbox.store import Outbox
from straw.config import Config
from straw.config_load import load_config
from straw.runner import Runner


def orders_config(
    directory: Path,
    *,
    db_url: str,
    redis_url: str,
    stream: str,
    mode: str = "incrementing",
    table: str = "ORDERS",
    batch_size: int = 1000,
    relay_batch_size: int = 1000,
    poll_interval: float = 0.05,
    **source: Any,
) -> Path:
    """Write a config for the fixture ORDERS table and return its path."""
    spec: dict[str, Any] = {
        "name": "orders",
        "kind": "db",
        "url": db_url,
        "table": table,
        "mode": mode,
        "entity": "order",
        "stream": stream,
        "mapping": ORDER_MAPPING,
        "timezone": "Europe/Amsterdam",
        "batch_size": batch_size,
        "poll_interval": poll_interval,
    }
    if mode == "incrementing":
        spec["incrementing_column"] = "ORDER_NO"
    else:
        spec["timestamp_column"] = "CHANGED_AT"
        spec["key_column"] = "ORDER_NO"
    spec.update(source)
    config = {
        "instance": "test",
        "redis": {"url": redis_url},
        "outbox": {"path": str(directory / "outbox.db")},
        "relay": {"batch_size": relay_batch_size, "idle_interval": 0.02, "backoff_max": 1.0},
        "entities": {"order": ORDER_ENTITY},
        "sources": [spec],
    }
    path = directory / "straw.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_once(path: Path, wait: float = 10.0) -> Any:
    config: Config = load_config(path)
    return Runner(config).run(once=True, wait=wait)


def read_stream(client: redis.Redis, stream: str) -> list[dict[str, Any]]:
    """Every entry as {'entry_id', 'seq', 'pos', 'event' (parsed JSON)}."""
    out = []
    for entry_id, fields in client.xrange(stream):
        out.append(
            {
                "entry_id": entry_id.decode(),
                "seq": int(fields[b"seq"]),
                "pos": fields[b"pos"].decode(),
                "event": orjson.loads(fields[b"event"]),
            }
        )
    return out


def source_state(directory: Path, source: str = "web-orders") -> tuple[str | None, str | None]:
    """(position, last error) of `source` in the outbox of the config in `directory`."""
    outbox = Outbox(directory / "outbox.db")
    try:
        state = {s.source: s for s in outbox.sources()}[source]
        return state.position, state.error
    finally:
        outbox.close()


def dead_letters(directory: Path) -> list[dict[str, Any]]:
    """Every dead letter in the outbox of the config in `directory`, oldest first."""
    outbox = Outbox(directory / "outbox.db")
    try:
        return sorted(outbox.dead_letters(limit=100), key=lambda d: d["id"])
    finally:
        outbox.close()
