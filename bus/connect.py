"""Open the bus a URL names: the scheme picks the module."""

from __future__ import annotations

from urllib.parse import urlsplit

from bus.names import NATS_SCHEMES, RABBITMQ_SCHEMES, REDIS_SCHEMES, JetStreamOptions, bus_kind
from bus.seam import Bus, Durability


def open_bus(
    url: str,
    *,
    socket_timeout: float = 10.0,
    maxlen: int | None = None,
    jetstream: JetStreamOptions | None = None,
    durability: Durability | None = None,
) -> Bus:
    """A client for the bus at `url`; connects lazily (errors come from the first call, as the seam's)."""
    scheme = urlsplit(url).scheme
    if scheme in REDIS_SCHEMES:
        from bus.redis import RedisBus, connect

        return RedisBus(connect(url, socket_timeout), maxlen=maxlen, durability=durability or Durability())
    # Each bus's client library is imported when named: a Redis site never loads nats-py or rstream, and the
    # relay process of a NATS or RabbitMQ site never loads redis-py (measured: a third of its start-up CPU).
    if scheme in NATS_SCHEMES:
        from bus.nats import NatsBus

        return NatsBus(url, socket_timeout=socket_timeout, maxlen=maxlen, options=jetstream)
    if scheme in RABBITMQ_SCHEMES:
        from bus.rabbitmq import RabbitStreamBus

        return RabbitStreamBus(url, socket_timeout=socket_timeout)
    raise ValueError(
        f"no bus speaks {scheme or 'a scheme-less'} URL; use redis://, rediss://, unix://, nats://, tls://, "
        "rabbitmq-stream:// or rabbitmq-stream+tls://"
    )


bus_name = bus_kind  # the bus's name in operators' lines (`straw check`, `status`, `stream`)


def checkpoint_label(url: str, stream: str, jetstream: JetStreamOptions | None = None) -> str:
    """Where a stream's checkpoint lives on this bus (the `checkpoint` column of `straw status`)."""
    kind = bus_kind(url)
    if kind == "rabbitmq":
        return f"tail of {stream}"  # bus/rabbitmq.py: the last message carries it
    if kind == "nats":  # bus/nats.py: the headers of the subject's last message carry it
        return f"last message of {stream} in JetStream stream {jetstream.stream if jetstream else 'straw'}"
    from bus.redis import checkpoint_key

    return checkpoint_key(stream)
