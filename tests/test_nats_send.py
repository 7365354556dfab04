"""The NATS relay's own header encoding (bus/nats.py `_send`) must put on the wire what nats-py's `publish` would.

The relay hands nats-py prebuilt HPUB frames (nats-py's per-header checks were half its CPU). So: the same
batch, with hostile event ids (CR/LF, padding, non-ASCII, a colon) and a hostile outbox identity, published
once through the fast path and once through nats-py's public `publish`, into two JetStream streams; every
stored message must carry the same headers and body, and the batch's chained expectations must hold both
ways (a mismatch would refuse the second message and the publish would return None).
"""

from __future__ import annotations

from collections.abc import Iterator

import orjson
import pytest

import bus.nats
from bus.nats import JetStreamOptions
from bus.seam import Checkpoint, Outgoing
from fixtures.private_nats import delete_jetstream
from tests.nats_support import OpenBus, buses, jetstream, nats_url, private_nats_for_session, read_messages
from tests.test_relay import SOURCE, pos

__all__ = ["buses", "jetstream", "nats_url", "private_nats_for_session"]  # fixtures, imported for pytest

HOSTILE_IDS = ["  padded id  ", "line\r\nbreak", "tab\there", "ünïcode-ид", "colon: value", "x" * 300]


def foreign_event(n: int, event_id: str) -> bytes:
    """A CloudEvent not spelled the way straw spells them (id first), so its id is parsed, not sliced."""
    return orjson.dumps({"id": f"{event_id}-{n}", "specversion": "1.0", "source": "t", "type": "t", "subject": str(n)})


@pytest.fixture
def second(nats_url: str, jetstream: JetStreamOptions) -> Iterator[JetStreamOptions]:
    options = JetStreamOptions(stream=jetstream.stream + "_public")
    yield options
    delete_jetstream(nats_url, options.stream)


def test_the_fast_send_stores_what_nats_pys_publish_stores(
    buses: OpenBus, nats_url: str, jetstream: JetStreamOptions, second: JetStreamOptions,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert bus.nats.RAW_SEND, "the pinned nats-py has the send internals the fast path uses"
    batch = [Outgoing(n, SOURCE, pos(n), foreign_event(n, HOSTILE_IDS[n % len(HOSTILE_IDS)])) for n in range(1, 25)]
    identity = " outbox\r\nwith a break "
    stored = {}
    for options, raw in ((jetstream, True), (second, False)):
        monkeypatch.setattr(bus.nats, "RAW_SEND", raw)
        subject = f"{options.stream}.orders"
        nats_bus = buses(nats_url, options)
        moved = nats_bus.publish(subject, Checkpoint(), batch, identity)
        assert moved is not None and moved.seq == 24, "every chained expectation matched"
        again = nats_bus.publish(subject, moved, [Outgoing(25, SOURCE, pos(25), foreign_event(25, "tail"))], identity)
        assert again is not None and again.seq == 25
        stored[raw] = [(m.data, m.headers) for m in read_messages(nats_url, options.stream, subject)]
    assert len(stored[True]) == 25
    assert stored[True] == stored[False]
    assert [h["Nats-Msg-Id"] for _, h in stored[True] if h] == [
        f"{HOSTILE_IDS[n % len(HOSTILE_IDS)]}-{n}".strip().replace("\r", " ").replace("\n", " ") for n in range(1, 25)
    ] + ["tail-25"]
