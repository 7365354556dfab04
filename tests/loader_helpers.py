"""Helpers of the loader tests: a stream filled as the relay fills it, and a config with a loader."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from pathlib import Path
from typing import Any

import redis
import yaml

from fixtures.legacy_orders import ORDER_ENTITY
from straw.records import encode_event, source_uri

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
