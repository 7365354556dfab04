"""Open the bus a URL names: the scheme picks the module."""

from __future__ import annotations

from urllib.parse import urlsplit

from bus.nats import JetStreamOptions, NatsBus
from bus.redis import RedisBus, connect
from bus.seam import Bus

REDIS_SCHEMES = ("redis", "rediss", "unix")
NATS_SCHEMES = ("nats", "tls")


def bus_name(url: str) -> str:
    """What `straw check/status/stream` call the bus at `url`."""
    return "nats" if urlsplit(url).scheme in NATS_SCHEMES else "redis"


def open_bus(
    url: str, *, socket_timeout: float = 10.0, maxlen: int | None = None, jetstream: JetStreamOptions | None = None
) -> Bus:
    """A client for the bus at `url`; connects lazily (errors come from the first call, as the seam's)."""
    scheme = urlsplit(url).scheme
    if scheme in REDIS_SCHEMES:
        return RedisBus(connect(url, socket_timeout), maxlen=maxlen)
    if scheme in NATS_SCHEMES:
        return NatsBus(url, socket_timeout=socket_timeout, maxlen=maxlen, options=jetstream)
    raise ValueError(
        f"no bus speaks {scheme or 'a scheme-less'} URL; use redis://, rediss://, unix://, nats:// or tls://"
    )
