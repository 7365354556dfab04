"""Move a consumer group back to a `seq` or a time, so the loader applies the stream again from there."""

from __future__ import annotations

import datetime as dt
from typing import Any

import redis

from loaders.redis_consumer import ensure_group

_PAGE = 1000
_MAX_SEQ_PART = 2**64 - 1


class ReplayError(Exception):
    pass


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def before(entry_id: str) -> str:
    """The largest id below `entry_id`: the group's last-delivered id, so `entry_id` is delivered next."""
    ms, seq = (int(p) for p in entry_id.split("-"))
    if seq:
        return f"{ms}-{seq - 1}"
    return f"{ms - 1}-{_MAX_SEQ_PART}" if ms else "0-0"


def first_at_seq(client: redis.Redis, stream: str, seq: int) -> tuple[str, int] | None:
    """The first entry whose `seq` is at least `seq` (seq grows along the stream), and its seq."""
    start = "-"
    while True:
        page: Any = client.xrange(stream, min=start, count=_PAGE)
        for entry_id, fields in page:
            found = int(fields.get(b"seq", 0))
            if found >= seq:
                return _text(entry_id), found
        if len(page) < _PAGE:
            return None
        start = "(" + _text(page[-1][0])


def rewind(client: redis.Redis, stream: str, group: str, *, from_seq: int | None, from_time: str | None) -> str:
    ensure_group(client, stream, group, "begin")
    if from_seq is not None:
        found = first_at_seq(client, stream, from_seq)
        if found is None:
            raise ReplayError(f"{stream} has no entry with seq {from_seq} or later")
        entry_id, seq = found
        oldest = client.xrange(stream, count=1)
        note = ""
        if seq > from_seq and oldest and _text(oldest[0][0]) == entry_id:
            note = f" (the stream starts at seq {seq}: older entries were trimmed)"
        client.xgroup_setid(stream, group, before(entry_id))
        return f"group {group} replays from seq {seq} (entry {entry_id}){note}"
    assert from_time is not None
    try:
        moment = dt.datetime.fromisoformat(from_time)
    except ValueError:
        raise ReplayError(f"--from-time {from_time!r} is not an ISO time; write e.g. 2026-11-29T10:00:00") from None
    moment = moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)
    entry_id = f"{int(moment.timestamp() * 1000)}-0"
    client.xgroup_setid(stream, group, before(entry_id))
    return f"group {group} replays entries added since {moment.isoformat()}"
