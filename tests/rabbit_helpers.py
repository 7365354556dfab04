"""Shared by the RabbitMQ Streams tests: a straw config that publishes there, and the stream read back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import yaml

from bus.rabbitmq import RabbitStreamBus, body_of, properties_of
from tests.helpers import orders_config


def rabbit_config(directory: Path, *, db_url: str, bus_url: str, stream: str, **options: Any) -> Path:
    """orders_config's file, with `bus.url` naming RabbitMQ instead of `redis:`."""
    path = orders_config(directory, db_url=db_url, redis_url="redis://unused:6379/0", stream=stream, **options)
    config = yaml.safe_load(path.read_text())
    del config["redis"]
    config = {"bus": {"url": bus_url, "socket_timeout": 5}, **config}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def read_rabbit_stream(bus: RabbitStreamBus, stream: str) -> list[dict[str, Any]]:
    """Every message as {'entry_id', 'seq', 'pos', 'event' (parsed JSON)}, as tests.helpers.read_stream gives."""
    out = []
    for offset, message in enumerate(bus.read_all(stream)):
        props = properties_of(message)
        out.append({"entry_id": str(offset), "seq": int(props["seq"]), "pos": str(props["pos"]),
                    "event": orjson.loads(body_of(message))})
    return out
