"""`straw dlq`: dead letters of both ends, one list.

Mapping dead letters live in the outbox (`outbox:<id>`): rows that could not be mapped. Loader dead letters
live in each loader stream's dead-letter stream (`<dead-letter stream>:<entry id>`): records a loader could
not apply after `max_deliveries`. `retry` re-maps a row with today's configuration (and queues the record,
the source's position unchanged; never a row whose later version was read since), or sends a record back to
its stream for its own group only.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import orjson

from loaders.dead_letters import ApplyHere, DeadLetterStore
from outbox.store import Outbox
from straw.config import AnySourceSpec, ChangeMode, Config, DbSourceSpec
from straw.config_scrape import ScrapeSourceSpec
from straw.mapping import Mapper
from straw.redact import describe
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
    """Map the raw row again with today's configuration; if it maps now, queue the record (an incremental
    source, unless its row has changed since) or have the next listing send the row (a keyed source)."""
    source = item.where
    try:
        spec = config.source(source)
    except KeyError:
        raise NoSuchItem(f"source {source!r} of {item.item} is no longer configured; drop it instead") from None
    from straw.runner import build_mapper  # the database drivers, only for a retry

    mapper = build_mapper(config, spec)
    changed = _changed_since(config, spec, item, mapper)
    if changed:
        return f"still a dead letter: {changed}"
    raw = orjson.loads(item.raw)
    columns = tuple(raw)
    letter_id = int(split(item.item)[1])
    row = RawBatch(columns=columns, rows=[tuple(raw[c] for c in columns)], positions=[item.details["position"]])
    if outbox.is_keyed(spec.name):
        # A listing sends what it finds: the row as it is at the next one, not this older version (which the
        # fixed mapping may have sent already, or a newer one may have replaced).
        if isinstance(spec, ScrapeSourceSpec):
            # Parsed on the page (a failed parse is kept as the text it read): only a listing can read it again.
            lower = {c.lower(): c for c in columns}
            key = mapper.key_subjects([tuple(raw.get(lower.get(c.lower(), c)) for c in mapper.key_columns())])[0]
            if key is None:
                return "still cannot be mapped: its key cannot be read; drop it"
            said = f"the next listing of {spec.name!r} reads it from the page again, with today's configuration"
        else:
            keyed = mapper.map_keyed(replace(row, keyed=True))
            if keyed.dead:
                return f"still cannot be mapped: {keyed.dead[0].reason}"
            key = keyed.changes[0].key
            said = (f"maps now: the next listing of {spec.name!r} sends its row as it is then, unless "
                    f"{spec.stream} has that data already")
        if outbox.resolve_dead_letter(letter_id, spec.name, spec.stream, None, relist=key) is None:
            raise NoSuchItem(f"{item.item} is gone: dropped or retried meanwhile")
        return said
    mapped = mapper.map(row)
    if mapped.dead:
        return f"still cannot be mapped: {mapped.dead[0].reason}"
    if outbox.resolve_dead_letter(letter_id, spec.name, spec.stream, mapped.events[0]) is None:
        raise NoSuchItem(f"{item.item} is gone: dropped or retried meanwhile")
    return f"mapped: queued for {spec.stream}; the relay of `straw run` publishes it"


def _changed_since(config: Config, spec: AnySourceSpec, item: Item, mapper: Mapper) -> str | None:
    """Why a timestamp-mode row must not be sent as it was when it failed, or None.

    Its position is (timestamp, key): if the row's timestamp has moved since, the later version was read on
    its own (delivered, or a dead letter of its own), and the old one sent now would land after it, an older
    version over a newer one. Other modes: an id is one version, and a keyed listing sends what it finds.
    """
    if not isinstance(spec, DbSourceSpec) or spec.mode is not ChangeMode.TIMESTAMP:
        return None
    at, drop = item.details["position"], f"`straw dlq drop {item.item}` removes it"
    from straw.runner import db_source

    source = None
    try:
        source = db_source(config, spec, mapper)
        now = source.position_now(at)
    except Exception as exc:
        return f"could not ask {spec.name!r} whether its row has changed since ({describe(exc)}); retry once it answers"
    finally:
        if source is not None:
            source.close()
    if now is None:
        return f"its row is no longer in the source; {drop}"
    if now != at:
        return f"its row has changed since (now at position {now}), and that later version was read on its own; {drop}"
    return None


def drop(item: Item, outbox: Outbox | None, store: DeadLetterStore | None) -> bool:
    where, ident = split(item.item)
    if where == OUTBOX:
        assert outbox is not None
        return outbox.resolve_dead_letter(int(ident), "", "", None) is not None
    assert store is not None
    return store.drop(where, ident)
