"""A taking-over instance's keyed state, rebuilt from the stream (README: Active/standby pair).

Snapshot sources, scraped listings and key sweeps (`deletes:`) compare what they list
with what they delivered before, per key; that state lives in the outbox of the node
that delivered it. The stream holds the same knowledge, as each key's last event, and
the new holder can read it: an `upserted` event's data is the canonical record, whose
digest (`straw.mapping.content_hash`, what the mapper compares) the first listing
then compares; a `deleted` event ends the key. Read in pages (bounded memory) and
written in the takeover's transaction.

A trimmed stream (`maxlen`, `max_age`, an XDEL) lacks the oldest events: a key whose
events were all trimmed is unknown. Then this outbox keeps its own keys, data unknown
(re-sent once if listed, deleted if not), and the log says so: see `outbox.keyed.hand_over`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import redis
import structlog

from outbox.handover import Handover, Last
from outbox.sweep import loads_event
from straw.config import AnySourceSpec, ChangeMode, Config, DbSourceSpec
from straw.mapping import content_hash
from straw.records import DELETED, source_uri

log = structlog.get_logger("straw.handover")

PAGE = 1_000  # stream entries per XRANGE: a page's events are all that is held in memory (5,000 cost 10 MB more)


@dataclass(frozen=True)
class Handed:
    """One source of a stream taken over, and what of it must be rebuilt."""

    name: str
    uri: str  # its events' CloudEvents `source`
    keyed: bool  # lists every key (snapshot, scraped listing)
    swept: bool  # incremental, with a key sweep
    key: tuple[str, ...]  # the entity key's fields


def handed(config: Config, specs: Iterable[AnySourceSpec]) -> list[Handed]:
    return [
        Handed(
            name=spec.name,
            uri=source_uri(config.instance, spec.name),
            keyed=not isinstance(spec, DbSourceSpec) or spec.mode is ChangeMode.SNAPSHOT,
            swept=isinstance(spec, DbSourceSpec) and spec.mode is not ChangeMode.SNAPSHOT and spec.deletes is not None,
            key=tuple(config.entities[spec.entity].key),
        )
        for spec in specs
    ]


def trimmed(client: redis.Redis, stream: str, seq: int) -> bool:
    """Whether the stream may lack events it once held: some were trimmed or deleted, or it cannot tell."""
    try:
        info = client.xinfo_stream(stream)
    except redis.ResponseError as exc:
        if "no such key" not in str(exc).lower():
            raise
        return seq > 0  # published to once, and gone since
    added = info.get("entries-added")
    if added is None:  # Redis before 7.0 does not count: assume the worst
        return True
    return int(added) > int(info["length"])


def rebuild(client: redis.Redis, stream: str, seq: int, sources: Sequence[Handed]) -> Handover | None:
    """What `Outbox.take_over` needs to rebuild the keyed state of `sources`; None if none of them is keyed."""
    wanted = {s.uri: s for s in sources if (s.keyed or s.swept)}
    if not wanted:
        return None
    exact = not trimmed(client, stream, seq)
    if not exact:
        log.warning(
            "takeover: the stream was trimmed, so keyed state is rebuilt only from what it still holds; "
            "rows whose last event was trimmed are published again once, keys this node delivered are "
            "compared again (a delete at least once), keys known to neither cannot be reported deleted",
            stream=stream, sources=sorted(s.name for s in wanted.values()),
        )
    return Handover(
        keyed=frozenset(s.name for s in wanted.values() if s.keyed),
        swept=frozenset(s.name for s in wanted.values() if s.swept),
        exact=exact,
        pages=_pages(client, stream, wanted),
    )


def _pages(client: redis.Redis, stream: str, wanted: dict[str, Handed]) -> Iterator[list[Last]]:
    """The stream's events of `wanted` sources, oldest first, as `Last`s, a page at a time."""
    start = "-"
    foreign = 0
    while entries := client.xrange(stream, min=start, max="+", count=PAGE):
        page: list[Last] = []
        for _id, fields in entries:
            last = _last(fields.get(b"event") if fields else None, wanted)
            if last is None:
                foreign += 1
            elif last.source:
                page.append(last)
        yield page
        start = "(" + (entries[-1][0].decode() if isinstance(entries[-1][0], bytes) else str(entries[-1][0]))
    if foreign:
        # Not written by straw's relay (or by a version that wrote something else): their keys are unknown.
        log.warning("takeover: stream entries that are not straw events were skipped", stream=stream,
                    entries=foreign)


def _last(raw: bytes | str | None, wanted: dict[str, Handed]) -> Last | None:
    """The entry's event as a `Last` (source "" for a source not wanted); None if it is no straw event."""
    try:
        event = loads_event(raw.encode() if isinstance(raw, str) else raw or b"")
        handed = wanted.get(event.get("source", ""))
        if handed is None:
            return Last("", "", None, b"")
        key, data = str(event["subject"]), event.get("data") or {}
        if str(event["type"]).endswith("." + DELETED):
            return Last(handed.name, key, None, b"")
        key_data = _dumps({k: data[k] for k in handed.key})
        return Last(handed.name, key, key_data, content_hash(data) if handed.keyed else b"")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _dumps(data: dict[str, Any]) -> str:
    try:
        return orjson.dumps(data).decode()
    except TypeError:  # integers beyond 64 bits
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False)
