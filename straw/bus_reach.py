"""A short look at the bus for the commands and pages that only read (`status`, `check`, `stream`, the
metrics): open, act, close; an unreachable or refusing bus is one redacted line, not an exception."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from bus.connect import open_bus
from bus.seam import Bus, BusDown, BusRefused
from straw.config import Config
from straw.redact import describe, redact

T = TypeVar("T")


def with_bus(config: Config, action: Callable[[Bus], T], timeout: float = 3.0) -> T | str:
    """Run `action` against the bus, or return why it could not be reached (one line, redacted)."""
    bus = open_bus(config.bus_spec.url, socket_timeout=timeout, jetstream=config.bus_spec.jetstream_options())
    try:
        return action(bus)
    except BusRefused as exc:
        return redact(str(exc))
    except BusDown as exc:
        return f"unreachable ({describe(exc.__cause__ or exc)})"
    finally:
        bus.close()
