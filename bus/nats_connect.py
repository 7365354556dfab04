"""One bounded NATS connection attempt: straw handles an outage itself (backoff, then a new connection).

nats-py 2.16 retries a refused first connect forever when `max_reconnect_attempts` is 0, whatever
`allow_reconnect` says (nats-io/nats.py#645): a relay, a loader or a test asking a server that is down
would hang instead of hearing "refused". One reconnect attempt, at once, bounds it to two tries, and the
last real failure (ConnectionRefusedError, a timeout) is raised rather than nats-py's "no servers".
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import nats
import nats.errors
from nats.aio.client import Client

ErrorCallback = Callable[[Exception], Awaitable[None]]


async def connect_once(url: str, *, timeout: float, error_cb: ErrorCallback | None = None, **options: Any) -> Client:
    """Connect without automatic reconnects; at most two tries of `timeout` seconds each."""
    failures: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        failures.append(exc)
        if error_cb is not None:
            await error_cb(exc)

    try:
        return await nats.connect(
            url, connect_timeout=timeout, allow_reconnect=False, max_reconnect_attempts=1, reconnect_time_wait=0,
            error_cb=on_error, **options,
        )
    except nats.errors.NoServersError:
        if failures:
            raise failures[-1] from None
        raise
