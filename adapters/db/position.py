"""Positions of a DB source: the change columns' values of the last row taken, as JSON text.

incrementing: `[value]`; timestamp: `[timestamp, key]`; snapshot: `[listing, key…]`
while listing, `[listing]` once complete. Values are kept exact:
datetimes as ISO text, decimals as strings; decoding uses the columns' types.
"""

from __future__ import annotations

import datetime as dt
import time
from decimal import Decimal
from typing import Any

import orjson


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    raise TypeError(f"cannot keep a {type(value).__name__} in a position")


def encode(values: tuple[Any, ...]) -> str:
    # Naive datetimes stay naive: the watermark is compared in the database's own terms.
    return orjson.dumps(values, default=_default).decode()


def decode(text: str, python_types: tuple[type | None, ...]) -> tuple[Any, ...]:
    raw = orjson.loads(text)
    if not isinstance(raw, list) or len(raw) != len(python_types):
        raise ValueError(f"stored position {text!r} does not fit this source's mode; was the mode changed?")
    return restore(raw, python_types)


def restore(raw: list[Any], python_types: tuple[type | None, ...]) -> tuple[Any, ...]:
    return tuple(_restore(value, kind) for value, kind in zip(raw, python_types, strict=True))


def _restore(value: Any, kind: type | None) -> Any:
    if value is None or kind is None or not isinstance(value, str):
        return value
    if kind is dt.datetime:
        return dt.datetime.fromisoformat(value)
    if kind is dt.date:
        return dt.date.fromisoformat(value)
    if kind is Decimal:
        return Decimal(value)
    if kind is int:
        return int(value)
    if kind is bytes:
        return bytes.fromhex(value)
    return value


def decode_snapshot(text: str | None, keys: int) -> tuple[int, list[Any] | None]:
    """snapshot: `[listing, key…]` mid-listing, `[listing]` once that listing is complete.

    Returns the listing to read and the raw key values to resume after (None: from the start).
    A listing is numbered by its start time in milliseconds, so the number never repeats, even
    if a position is lost and the count would otherwise start over: it is part of event ids.
    """
    if text is None:
        return _new_listing(0), None
    raw = orjson.loads(text)
    if not isinstance(raw, list) or not raw or not isinstance(raw[0], int) or len(raw) not in (1, keys + 1):
        raise ValueError(f"stored position {text!r} does not fit mode 'snapshot'; was the mode or key changed?")
    if len(raw) == 1:
        return _new_listing(raw[0]), None
    return raw[0], raw[1:]


def _new_listing(previous: int) -> int:
    return max(time.time_ns() // 1_000_000, previous + 1)
