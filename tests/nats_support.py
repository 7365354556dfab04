"""NATS JetStream for the tests: the machine's server (or a private one), a JetStream stream per test, read-back.

Fixtures are imported by the NATS test modules (`from tests.nats_support import ...`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import nats.js.errors
import orjson
import pytest
import yaml
from nats.js.api import RawStreamMsg

from bus.nats import POSITIONS, SEQ, JetStreamOptions, NatsBus
from bus.nats_connect import connect_once
from fixtures.private_nats import NatsServer, delete_jetstream, nats_server_binary, start_private_nats
from tests.lazy_server import lazy_server

NATS_URL = os.environ.get("STRAW_TEST_NATS_URL", "nats://127.0.0.1:4222")


async def _alive(url: str) -> bool:
    try:
        nc = await connect_once(url, timeout=1)
    except Exception:
        return False
    try:
        await nc.jetstream().account_info()
        return True
    except Exception:
        return False
    finally:
        await nc.close()


@pytest.fixture(scope="session")
def private_nats_for_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], str]]:
    """A private `nats-server -js` of this worker, started the first time a test finds no machine server; and,
    while the machine's server is used, one stream of this worker kept on it for the session: nats-server 2.9
    removes its store's `streams` directory with the last stream, and a stream created at that moment fails
    ("could not create storage directory", seen once in a CI rehearsal, tests creating and deleting streams
    side by side). While one stream stays, the directory stays."""
    kept = f"straw_test_keep_{uuid.uuid4().hex[:12]}"
    machine_used = False

    servers = lazy_server(lambda: start_private_nats(tmp_path_factory.mktemp("nats")))
    private_url = next(servers)

    def url() -> str:
        nonlocal machine_used
        if asyncio.run(_alive(NATS_URL)):
            if not machine_used:
                asyncio.run(_add_stream(NATS_URL, kept))
                machine_used = True
            return NATS_URL
        if nats_server_binary() is None:
            pytest.skip(f"no NATS JetStream at {NATS_URL} and no nats-server binary (apt-get install nats-server)")
        return private_url()

    yield url
    if machine_used:
        with contextlib.suppress(Exception):  # the machine's server gone meanwhile: nothing left to delete
            delete_jetstream(NATS_URL, kept)
    next(servers, None)  # stops the private server, if one was started


async def _add_stream(url: str, name: str) -> None:
    nc = await connect_once(url, timeout=5)
    try:
        await nc.jetstream().add_stream(name=name, subjects=[f"{name}.>"])
    finally:
        await nc.close()


@pytest.fixture
def nats_url(private_nats_for_session: Callable[[], str]) -> str:
    """STRAW_TEST_NATS_URL (default the machine's 127.0.0.1:4222), else a private `nats-server -js`.

    Asked per test: a machine server that goes away in the middle of a run costs the tests that were using
    it, not every later one.
    """
    return private_nats_for_session()


@pytest.fixture
def jetstream(nats_url: str) -> Iterator[JetStreamOptions]:
    """A JetStream stream name of this test alone (straw creates it); deleted afterwards."""
    options = JetStreamOptions(stream=f"straw_test_{uuid.uuid4().hex[:12]}")
    yield options
    delete_jetstream(nats_url, options.stream)


OpenBus = Callable[..., NatsBus]


@pytest.fixture
def buses() -> Iterator[OpenBus]:
    """`buses(url, options, **kwargs)`: NatsBus objects of this test, all closed afterwards."""
    opened: list[NatsBus] = []

    def open_(url: str, options: JetStreamOptions, **kwargs: Any) -> NatsBus:
        opened.append(NatsBus(url, options=options, **kwargs))
        return opened[-1]

    yield open_
    for bus in opened:
        bus.close()


@pytest.fixture
def subject(jetstream: JetStreamOptions) -> str:
    """A subject of this test alone (JetStream refuses two streams that take one subject)."""
    return f"{jetstream.stream}.orders"


@pytest.fixture
def private_nats(tmp_path: Path) -> Iterator[NatsServer]:
    if nats_server_binary() is None:
        pytest.skip("no nats-server binary (apt-get install nats-server)")
    server = start_private_nats(tmp_path / "nats")
    try:
        yield server
    finally:
        server.kill()


async def _messages(url: str, stream: str, subject: str) -> list[RawStreamMsg]:
    """Through an ordered push consumer filtered on the subject: one pass, in stream order."""
    nc = await connect_once(url, timeout=5)
    js = nc.jetstream(timeout=10)
    try:
        try:
            info = await js.stream_info(stream, subjects_filter=subject)
        except nats.js.errors.NotFoundError:
            return []
        count = (info.state.subjects or {}).get(subject, 0)
        found: list[RawStreamMsg] = []
        if not count:
            return found
        sub = await js.subscribe(subject, stream=stream, ordered_consumer=True)
        while len(found) < count:
            msg = await sub.next_msg(timeout=10)
            found.append(RawStreamMsg(subject=msg.subject, seq=msg.metadata.sequence.stream, data=msg.data,
                                      headers=dict(msg.headers or {})))
        await sub.unsubscribe()
        return found
    finally:
        await nc.close()


def read_messages(url: str, stream: str, subject: str) -> list[RawStreamMsg]:
    """Every message of `subject` in the JetStream stream, oldest first, headers and all."""
    return asyncio.run(_messages(url, stream, subject))


def read_subject(url: str, stream: str, subject: str) -> list[dict[str, Any]]:
    """Every message as tests/helpers.read_stream gives a Redis entry: entry_id, seq, pos, event (parsed)."""
    out = []
    for msg in read_messages(url, stream, subject):
        headers = msg.headers or {}
        positions = orjson.loads(headers[POSITIONS])
        out.append({
            "entry_id": str(msg.seq),
            "seq": int(headers[SEQ]),
            "pos": positions.get("orders"),
            "event": orjson.loads(msg.data or b""),
            "headers": headers,
        })
    return out


def use_nats(config: Path, url: str, options: JetStreamOptions) -> Path:
    """Point a config written by tests/helpers.orders_config at the NATS bus instead of Redis."""
    data = yaml.safe_load(config.read_text())
    data.pop("redis", None)
    data["bus"] = {"url": url, "jetstream": {"stream": options.stream}}
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    return config
