"""straw's hand-made AMQP 1.0 encoding must be rstream's, byte for byte, for any value a record can carry.

The relay publishes `bus.amqp.encode(...)` instead of `bytes(rstream.AMQPMessage(...))` (for speed); a
consumer must not be able to tell. So: every size boundary of every field (255/256 bytes, a map past 255
bytes, seq at each integer width), any text (non-ASCII, control characters, empty), empty and large bodies,
compared with rstream's own encoder, and decoded back with rstream's decoder.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rstream import AMQPMessage, Properties, amqp_decoder

from bus.amqp import CONTENT_TYPE, encode
from bus.rabbitmq import body_of, properties_of

texts = st.text(st.characters(exclude_categories=("Cs",)), max_size=300)  # a lone surrogate is no UTF-8 at all


def rstreams(seq: int, position: str, source: str, outbox: str, positions: str, body: bytes) -> bytes:
    return bytes(AMQPMessage(
        body=body,
        properties=Properties(content_type=CONTENT_TYPE),
        application_properties={"seq": seq, "pos": position, "source": source, "outbox": outbox,
                                "positions": positions},
    ))


@settings(max_examples=300, deadline=None)
@given(seq=st.integers(-(2**63), 2**63 - 1), position=texts, source=texts, outbox=texts, positions=texts,
       body=st.binary(max_size=600))
def test_any_record_encodes_as_rstream_would_and_decodes_back(
    seq: int, position: str, source: str, outbox: str, positions: str, body: bytes
) -> None:
    mine = encode(seq, position, source, outbox, positions, body)
    assert mine == rstreams(seq, position, source, outbox, positions, body)
    back = amqp_decoder(mine)
    assert body_of(back) == body
    assert properties_of(back) == {"seq": seq, "pos": position, "source": source, "outbox": outbox,
                                   "positions": positions}
    assert back.properties is not None and back.properties.content_type in (CONTENT_TYPE, CONTENT_TYPE.encode())


@pytest.mark.parametrize("seq", [0, 127, 128, -128, -129, 2**31 - 1, 2**31, -(2**31), -(2**31) - 1, 2**63 - 1])
@pytest.mark.parametrize("size", [0, 1, 230, 255, 256, 70_000])
def test_every_width_boundary_matches(seq: int, size: int) -> None:
    text, body = "x" * size, b"{" * size
    assert encode(seq, text, "s", "o", text, body) == rstreams(seq, text, "s", "o", text, body)
    # The application-properties map crosses from map8 to map32 at 255 bytes of entries.
    for short in range(200, 260):
        assert encode(seq, "p" * short, "s", "o", "", body) == rstreams(seq, "p" * short, "s", "o", "", body)
