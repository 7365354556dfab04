"""A JSON Lines loader on NATS JetStream takes over what an earlier run had pulled (`NatsConsumer(adopt=True)`):
those entries come before anything newer, without waiting `claim_idle`, and the durable's config is this
loader's again after (real nats-server, one JetStream stream per test)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

from bus.nats_connect import connect_once
from loaders.consumer import BusDown
from loaders.nats_consumer import NatsConsumer, durable_name
from tests.loader_buses import LoaderBus, loader_bus
from tests.loader_helpers import order_data
from tests.nats_support import nats_url, private_nats_for_session

__all__ = ["loader_bus", "nats_url", "private_nats_for_session"]  # fixtures, imported for pytest

pytestmark = pytest.mark.parametrize("loader_bus", ["nats"], indirect=True)


@pytest.fixture
def members(loader_bus: LoaderBus) -> Iterator[Any]:
    opened: list[NatsConsumer] = []

    def open_(name: str, *, adopt: bool, claim_idle: float = 60.0) -> NatsConsumer:
        assert loader_bus.jetstream is not None
        consumer = NatsConsumer(loader_bus.url, loader_bus.jetstream, [loader_bus.stream], "g", name,
                                claim_idle=claim_idle, max_deliveries=5, dead_letters=lambda s: f"{s}.dlq",
                                adopt=adopt)
        opened.append(consumer)
        return consumer

    yield open_
    for consumer in opened:
        consumer.close()


def durable(bus: LoaderBus) -> Any:
    async def info() -> Any:
        assert bus.jetstream is not None
        nc = await connect_once(bus.url, timeout=5)
        try:
            return await nc.jetstream().consumer_info(bus.jetstream.stream, durable_name("g", bus.stream))
        finally:
            await nc.close()

    return asyncio.run(info())


def seqs(deliveries: list[Any]) -> list[int]:
    return [int(d.fields["seq"]) for d in deliveries]


def take(member: NatsConsumer, count: int) -> list[Any]:
    """`count` deliveries, over as many reads as it takes (a loaded server may answer a fetch in parts)."""
    got: list[Any] = []
    deadline = time.monotonic() + 30
    while len(got) < count and time.monotonic() < deadline:
        got += member.read(count - len(got), 0.5)
    return got


def test_what_a_killed_run_pulled_comes_first_in_order_and_at_once(loader_bus: LoaderBus, members: Any) -> None:
    loader_bus.publish([("upserted", order_data(n)) for n in range(1, 11)])
    old = members("old", adopt=True)
    first = take(old, 4)
    assert seqs(first) == [1, 2, 3, 4]
    old.ack(first[1:3])  # 2 and 3 written and acked; 1 and 4 pulled, then the run is killed
    assert seqs(take(old, 2)) == [5, 6]
    old.close()
    started = time.monotonic()
    new = members("new", adopt=True)
    taken = new.read(3, 0.5)
    # Not after claim_idle (60 s): now, and before 7..10, which a plain member would get first.
    assert time.monotonic() - started < 30
    assert seqs(taken) == [1, 4, 5]
    assert {d.deliveries for d in taken} == {2}  # one more delivery each, as a redelivery counts
    rest = new.read(3, 0.5)
    assert seqs(rest) == [6]  # the adopted ones, in batches of the count asked, before anything new
    new.ack(taken + rest)
    # While adopting, ack_wait is 1 s: on a loaded machine 1 can come once more before its ack lands ([1, 7, 8, 9]
    # seen in CI), which a loader skips by its seq. What must hold: 7..10 in order, nothing new before them.
    fresh: list[int] = []
    deadline = time.monotonic() + 30
    while len(fresh) < 4 and time.monotonic() < deadline:
        fresh += [s for s in seqs(new.read(4 - len(fresh), 0.5)) if s > 6]
    assert fresh == [7, 8, 9, 10]
    info = durable(loader_bus)
    assert info.config.ack_wait == pytest.approx(60.0) and info.config.max_ack_pending == -1
    assert info.num_ack_pending == 4  # 7..10, held by the new run


def test_a_member_that_does_not_adopt_gets_newer_entries_first(loader_bus: LoaderBus, members: Any) -> None:
    """What adopting changes: without it (a SQL loader's members, which order by key versions) the entries a
    killed run held come back only after claim_idle, behind newer ones."""
    loader_bus.publish([("upserted", order_data(n)) for n in range(1, 7)])
    old = members("old", adopt=False)
    assert seqs(take(old, 3)) == [1, 2, 3]
    old.close()
    assert seqs(take(members("new", adopt=False), 3)) == [4, 5, 6]


def test_a_lost_connection_is_a_restart_what_was_pulled_on_it_comes_first(
    loader_bus: LoaderBus, members: Any
) -> None:
    loader_bus.publish([("upserted", order_data(n)) for n in range(1, 9)])
    member = members("m", adopt=True)
    held = take(member, 3)
    assert seqs(held) == [1, 2, 3]
    nc = member._io.nc
    assert nc is not None
    member._io.loop.run_until_complete(nc.close())  # the connection drops with 1..3 unacked
    with pytest.raises(BusDown):
        member.ack(held)
    adopted = member.read(10, 0.5)
    assert seqs(adopted) == [1, 2, 3]
    # Acked as a loader does once it applied them: unacked, they come again after the adopting ack_wait (1 s),
    # which a loaded machine's next read can outlast ([1, 2, 3, 4, 5] seen in CI).
    member.ack(adopted)
    assert seqs(take(member, 5)) == [4, 5, 6, 7, 8]


def test_a_config_left_by_a_run_killed_while_adopting_is_set_back(loader_bus: LoaderBus, members: Any) -> None:
    loader_bus.publish([("upserted", order_data(n)) for n in range(1, 4)])
    first = members("first", adopt=True)
    first.ack(take(first, 3))
    first.close()

    async def leave_adopting_config() -> None:
        assert loader_bus.jetstream is not None
        nc = await connect_once(loader_bus.url, timeout=5)
        try:
            js = nc.jetstream()
            info = await js.consumer_info(loader_bus.jetstream.stream, durable_name("g", loader_bus.stream))
            await js.add_consumer(loader_bus.jetstream.stream, config=info.config.evolve(ack_wait=1.0,
                                                                                         max_ack_pending=3))
        finally:
            await nc.close()

    asyncio.run(leave_adopting_config())
    loader_bus.publish([("upserted", order_data(n)) for n in range(4, 10)])
    member = members("second", adopt=True, claim_idle=45.0)
    assert seqs(take(member, 6)) == [4, 5, 6, 7, 8, 9]  # not capped at 3 pending
    info = durable(loader_bus)
    assert info.config.ack_wait == pytest.approx(45.0) and info.config.max_ack_pending == -1
