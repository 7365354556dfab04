"""The loader tests' view of a bus, whichever it is: a config that names it, records published as the relay
publishes them (through the bus's own `Bus.publish`), the newest seq, and the dead letters read back."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import pytest
import yaml

from bus.connect import open_bus
from bus.names import JetStreamOptions
from bus.nats_connect import connect_once
from bus.rabbitmq import RabbitStreamBus, properties_of
from bus.redis import checkpoint_key
from bus.seam import Bus, Outgoing
from fixtures.legacy_orders import ORDER_ENTITY
from fixtures.private_nats import delete_jetstream
from straw.records import encode_event
from tests.loader_helpers import SOURCE

BUSES = ["redis", "nats", "rabbitmq"]
IDENTITY = "test-outbox"


@dataclass
class LoaderBus:
    """One bus of one test: its URL, its streams' names, and a publisher."""

    kind: str
    url: str
    stream: str
    jetstream: JetStreamOptions | None = None
    published: dict[str, int] = field(default_factory=dict)  # stream -> last seq published here
    _bus: Bus | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)  # bus clients are not for two threads at once

    @property
    def bus(self) -> Bus:
        if self._bus is None:
            self._bus = open_bus(self.url, jetstream=self.jetstream, socket_timeout=10.0)
        return self._bus

    def section(self) -> dict[str, Any]:
        """The config's `bus:` block."""
        block: dict[str, Any] = {"url": self.url}
        if self.jetstream is not None:
            block["jetstream"] = {"stream": self.jetstream.stream}
        return block

    def publish(self, changes: list[tuple[str, dict[str, Any]]], stream: str | None = None) -> int:
        """Publish (op, data) changes as the relay does, seq after seq; the last seq."""
        stream = stream or self.stream
        seq = self.published.get(stream, 0)
        batch = []
        for op, data in changes:
            seq += 1
            event = encode_event(source=SOURCE, entity="order", op=op, key=str(data["order_no"]),
                                 position=f"[{seq}]", time="2026-11-29T10:00:00Z", data=data)
            batch.append(Outgoing(seq, "orders", f"[{seq}]", event))
        for start in range(0, len(batch), 200):
            seen = self.bus.checkpoint(stream)
            assert self.bus.publish(stream, seen, batch[start:start + 200], IDENTITY) is not None
        self.published[stream] = seq
        return seq

    def newest_seq(self, stream: str | None = None) -> int:
        with self._lock:
            newest = self.bus.newest(stream or self.stream, 1)
        return newest[0].seq if newest else 0

    def dead_letters(self, dlq: str) -> list[dict[str, str]]:
        """The dead letters' metadata (stream, entry, group, deliveries, error, seq), oldest first."""
        if self.kind == "redis":
            client = self.bus.client  # type: ignore[attr-defined]
            return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in client.xrange(dlq)]
        if self.kind == "rabbitmq":
            assert isinstance(self.bus, RabbitStreamBus)
            return [{k: str(v) for k, v in properties_of(m).items()} for m in self.bus.read_all(dlq)]
        return asyncio.run(_nats_dead_letters(self.url, self.jetstream, dlq))

    def close(self) -> None:
        if self._bus is not None:
            self._bus.close()


async def _nats_dead_letters(url: str, options: JetStreamOptions | None, dlq: str) -> list[dict[str, str]]:
    assert options is not None
    nc = await connect_once(url, timeout=5)
    try:
        js = nc.jetstream()
        found, seq = [], 1
        while True:
            try:
                msg = await js.get_msg(options.stream, seq, subject=dlq, next=True)
            except nats.js.errors.NotFoundError:
                return found
            headers = dict(msg.headers or {})
            found.append({k.removeprefix("Straw-Dlq-").lower(): v for k, v in headers.items()}
                         | {"seq": headers.get("Straw-Seq", "")})
            seq = int(msg.seq or 0) + 1
    finally:
        await nc.close()


@pytest.fixture(params=BUSES)
def loader_bus(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LoaderBus]:
    """Each bus in turn, with a stream (and on NATS a JetStream stream) of this test alone."""
    kind = request.param
    name = f"lb.{uuid.uuid4().hex[:10]}.orders"
    if kind == "redis":
        url = request.getfixturevalue("redis_url")
        bus = LoaderBus(kind, url, name)
        yield bus
        client = bus.bus.client  # type: ignore[attr-defined]
        for key in client.scan_iter(match=f"{name}*"):
            client.delete(key)
        client.delete(checkpoint_key(name))
        bus.close()
    elif kind == "nats":
        url = request.getfixturevalue("nats_url")
        options = JetStreamOptions(stream=f"straw_lb_{uuid.uuid4().hex[:10]}")
        bus = LoaderBus(kind, url, name, options)
        yield bus
        bus.close()
        delete_jetstream(url, options.stream)
    else:
        url = request.getfixturevalue("rabbitmq_url")
        bus = LoaderBus(kind, url, name)
        yield bus
        assert isinstance(bus.bus, RabbitStreamBus)
        for stream in (name, f"{name}.dlq", *[s for s in bus.published if s != name]):
            bus.bus.delete_stream(stream)
        bus.close()


def bus_loader_config(directory: Path, bus: LoaderBus, loaders: list[dict[str, Any]]) -> Path:
    """A config with `loaders` on `bus` (its source is never run: the tests publish themselves)."""
    config = {
        "instance": "test",
        "bus": bus.section(),
        "outbox": {"path": str(directory / "outbox.db")},
        "entities": {"order": ORDER_ENTITY},
        "sources": [{"name": "orders", "url": f"sqlite:///{directory / 'legacy.db'}", "table": "ORDERS",
                     "mode": "incrementing", "incrementing_column": "ORDER_NO", "entity": "order",
                     "stream": bus.stream}],
        "loaders": loaders,
    }
    path = directory / "straw.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
