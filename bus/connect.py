"""Open the bus a URL names: the scheme picks the module."""

from __future__ import annotations

from urllib.parse import urlsplit

from bus.redis import RedisBus, connect
from bus.seam import Bus, Durability

REDIS_SCHEMES = ("redis", "rediss", "unix")


def open_bus(
    url: str, *, socket_timeout: float = 10.0, maxlen: int | None = None, durability: Durability | None = None
) -> Bus:
    """A client for the bus at `url`; connects lazily (errors come from the first call, as the seam's)."""
    scheme = urlsplit(url).scheme
    if scheme in REDIS_SCHEMES:
        return RedisBus(connect(url, socket_timeout), maxlen=maxlen, durability=durability or Durability())
    raise ValueError(f"no bus speaks {scheme or 'a scheme-less'} URL; use redis://, rediss:// or unix://")
