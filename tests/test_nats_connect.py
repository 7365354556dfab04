"""A NATS server that is not there is an answer, at once: never a connect that retries forever.

nats-py 2.16 retries a refused first connect forever when `max_reconnect_attempts` is 0, whatever
`allow_reconnect` says (nats-io/nats.py#645). A CI run with the machine's nats-server down hung that way
until its deadline; these tests hold the bound for the relay, the loader and the tests' own probe.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from bus.names import JetStreamOptions
from bus.nats import NatsBus
from bus.nats_connect import connect_once
from bus.seam import BusDown
from loaders.nats_consumer import NatsLoop
from straw.local_redis import free_port
from tests.nats_support import _alive

pytestmark = pytest.mark.timeout(60)  # a regression hangs: fail it fast


def closed_url() -> str:
    return f"nats://127.0.0.1:{free_port()}"  # free: nothing listens there


def test_connect_once_raises_the_refusal_instead_of_retrying() -> None:
    async def attempt() -> object:
        return await asyncio.wait_for(connect_once(closed_url(), timeout=1), 20)

    started = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        asyncio.run(attempt())
    assert time.monotonic() - started < 10


def test_the_relays_bus_says_refused_when_the_server_is_not_there() -> None:
    bus = NatsBus(closed_url(), options=JetStreamOptions(stream="s"), socket_timeout=2)
    try:
        with pytest.raises(BusDown, match=r"nats unreachable \(ConnectionRefusedError"):
            bus.checkpoint("erp.orders")
    finally:
        bus.close()


def test_the_loaders_connection_says_refused_when_the_server_is_not_there() -> None:
    nats_loop = NatsLoop(closed_url(), 2.0)
    try:
        with pytest.raises(ConnectionRefusedError):
            nats_loop.loop.run_until_complete(asyncio.wait_for(nats_loop.connect(), 20))
    finally:
        nats_loop.loop.close()


def test_the_tests_probe_answers_no_when_the_server_is_not_there() -> None:
    """The probe that decides between the machine's server and a private one must not hang."""
    assert asyncio.run(asyncio.wait_for(_alive(closed_url()), 20)) is False
