"""`straw dlq`: dead letters of both ends, one list.

Mapping dead letters live in the outbox (`outbox:<id>`): rows that could not be mapped. Loader dead letters
live in each loader stream's dead-letter stream (`<dead-letter stream>:<entry id>`): records a loader could
not apply after `max_deliveries`. `retry` re-maps a row with today's configuration (and queues the record,
the source's position unchanged), or sends a record back to its stream for its own group only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from loaders.dead_letters import ApplyHere, DeadLetterStore
from outbox.store import Outbox
from straw.config import Config, DbSourceSpec
from straw.mapping import Mapper
from straw.records import source_uri
from straw.source import RawBatch

OUTBOX = "outbox"


@dataclass(frozen=True)
class Item:
    item: str  # what the commands take: outbox:<id> or <dead-letter stream>:<entry id>
    kind: str  # 'mapping' or 'loader'
    where: str  # the source, or stream and group
    when: str
    reason: str
    raw: str  # the raw row (JSON) or the record's event
    details: dict[str, str]


class NoSuchItem(Exception):
    pass


def dead_letter_streams(config: Config) -> list[str]:
    return sorted({loader.dead_letters_of(s) for loader in config.loaders for s in loader.streams})


def outbox_items(outbox: Outbox, limit: int) -> list[Item]:
    return [_outbox_item(row) for row in outbox.dead_letters(None, limit)]


def _outbox_item(row: dict[str, Any]) -> Item:
    return Item(f"{OUTBOX}:{row['id']}", "mapping", row["source"], row["created_at"] or "", row["reason"], row["raw"],
                {"position": row["position"]})


def stream_items(store: DeadLetterStore, config: Config, limit: int) -> list[Item]:
    items = []
    for dlq in dead_letter_streams(config):
        for entry_id, fields in store.newest(dlq, limit):
            items.append(_stream_item(dlq, entry_id, fields))
    return items


def _stream_item(dlq: str, entry_id: str, fields: dict[str, str]) -> Item:
    return Item(f"{dlq}:{entry_id}", "loader", f"{fields.get('stream', '?')} / {fields.get('group', '?')}",
                fields.get("at", ""), fields.get("error", ""), fields.get("event", ""), fields)


def split(item: str) -> tuple[str, str]:
    where, sep, ident = item.rpartition(":")
    if not sep or not where or not ident:
        raise NoSuchItem(f"{item!r} is not an item; write outbox:<id> or <dead-letter stream>:<entry id> "
                         "as `straw dlq list` shows them")
    return where, ident


def find(item: str, outbox: Outbox | None, store: DeadLetterStore | None, config: Config) -> Item:
    where, ident = split(item)
    if where == OUTBOX:
        row = outbox.dead_letter(int(ident)) if outbox is not None and ident.isdigit() else None
        if row is None:
            raise NoSuchItem(f"no mapping dead letter {item} in the outbox")
        return _outbox_item(row)
    if where not in dead_letter_streams(config):
        raise NoSuchItem(f"{where} is not a dead-letter stream of this configuration's loaders "
                         f"({', '.join(dead_letter_streams(config)) or 'none'})")
    assert store is not None
    found = store.get(where, ident)
    if found is None:
        raise NoSuchItem(f"no entry {ident} in {where}")
    return _stream_item(where, ident, found)


def retry_loader(store: DeadLetterStore, item: Item, apply_here: ApplyHere) -> str:
    """Through its group again: back to its stream where the bus allows, else applied to its target here
    (loaders/dead_letters.py says which bus does what)."""
    dlq, entry_id = split(item.item)
    return store.retry(dlq, entry_id, dict(item.details), apply_here)


def retry_mapping(config: Config, outbox: Outbox, item: Item) -> str:
    """Map the raw row again with today's configuration; queue the record if it maps now."""
    source = item.where
    try:
        spec = config.source(source)
    except KeyError:
        raise NoSuchItem(f"source {source!r} of {item.item} is no longer configured; drop it instead") from None
    mapper = Mapper(
        source_uri=source_uri(config.instance, spec.name), source_name=spec.name, entity_name=spec.entity,
        entity=config.entities[spec.entity], mapping=spec.mapping, zone=spec.zone, encoding=spec.encoding,
        trim=spec.trim_char if isinstance(spec, DbSourceSpec) else False,
    )
    raw = orjson.loads(item.raw)
    columns = tuple(raw)
    mapped = mapper.map(RawBatch(columns=columns, rows=[tuple(raw[c] for c in columns)],
                                 positions=[item.details["position"]]))
    if mapped.dead:
        return f"still cannot be mapped: {mapped.dead[0].reason}"
    outbox.resolve_dead_letter(int(split(item.item)[1]), spec.name, spec.stream, mapped.events[0])
    return f"mapped: queued for {spec.stream}; the relay of `straw run` publishes it"


def drop(item: Item, outbox: Outbox | None, store: DeadLetterStore | None) -> bool:
    where, ident = split(item.item)
    if where == OUTBOX:
        assert outbox is not None
        return outbox.resolve_dead_letter(int(ident), "", "", None)
    assert store is not None
    return store.drop(where, ident)
