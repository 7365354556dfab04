"""The relay's command packer writes the very bytes redis-py's own would."""

from __future__ import annotations

from typing import Any

import pytest
from redis.connection import HiredisRespSerializer
from redis.exceptions import DataError

from bus.redis import _Packer

COMMANDS: list[tuple[Any, ...]] = [
    ("EVALSHA", "abc", 2, "s", "straw:ckpt:{s}", 7, "", "id", "2026-01-01T00:00:00.000+00:00", "", 1,
     "pos:orders", "42", 1, "42", b'{"id":"\xc3\xa9\x00\r\n"}', 2, "", b""),
    ("XADD", "s", "*", "seq", 18446744073709551617, "event", "\u00e9\U0001f600 \r\n"),
    ("HSET", "k", "f", 2.5, "g", -0.0, "h", 1e300),
    ("CONFIG GET", "maxmemory"),  # a spaced name: split into words
    (b"PING",),
    ("SET", "k", bytearray(b"\x00\xff")),  # what hiredis refuses: redis-py's path turns it into bytes
    ("SET", "k", memoryview(b"\x00\xff")),
]


@pytest.mark.parametrize("command", COMMANDS, ids=range(len(COMMANDS)))
def test_same_bytes_as_redis_py(command: tuple[Any, ...]) -> None:
    ours, theirs = _Packer().pack(*command), HiredisRespSerializer().pack(*command)
    assert b"".join(ours) == b"".join(theirs)


def test_refused_argument_is_redis_py_error() -> None:
    with pytest.raises(DataError):
        _Packer().pack("SET", "k", object())
