"""A stream entry as a loader sees it: the parsed CloudEvent with typed data, and where it came from."""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import orjson

from straw.config import EntitySpec, FieldType
from straw.records import DELETED, UPSERTED


class BadRecord(ValueError):
    """An entry that is not a straw record this loader knows: it is dead-lettered, never applied."""


@dataclass(frozen=True, slots=True)
class Delivery:
    """One stream entry handed to this consumer, as raw as the bus gives it."""

    stream: str
    entry_id: str
    fields: Mapping[str, str]
    deliveries: int  # how often the group has handed it out, this time included


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs a setattr call per field, per record
class Record:
    """A parsed straw record: what a loader needs to apply it once, in order."""

    stream: str
    entry_id: str
    seq: int  # strictly increasing along the stream: the idempotence key with `stream`
    position: str  # the source position (JSON text)
    id: str  # the CloudEvents id: the same change read twice has the same id
    entity: str
    op: str  # 'upserted' or 'deleted'
    subject: str  # the entity key as text
    data: dict[str, Any]  # typed: decimals as Decimal, datetimes aware, dates as date, bytes as bytes
    event: dict[str, Any]  # the whole CloudEvent, parsed (its `data` typed)
    raw: str  # the event's JSON text as it was on the stream
    deliveries: int
    retry: bool = False  # sent again by `straw dlq retry`: applied unless a newer change of its key was

    @property
    def key(self) -> tuple[str, str]:
        return self.entity, self.subject


def _datetime(value: Any) -> dt.datetime:
    parsed = dt.datetime.fromisoformat(value)
    if parsed.tzinfo is None:  # straw always writes an offset; an entry without one is not straw's
        raise ValueError(f"datetime without an offset: {value!r}")
    return parsed


_DECODERS: dict[FieldType, Callable[[Any], Any]] = {
    FieldType.DECIMAL: lambda v: Decimal(v) if isinstance(v, str) else Decimal(str(v)),
    FieldType.DATETIME: _datetime,
    FieldType.DATE: dt.date.fromisoformat,
    FieldType.BYTES: lambda v: base64.b64decode(v, validate=True),
    FieldType.INTEGER: lambda v: v if isinstance(v, int) and not isinstance(v, bool) else int(v),
}


_PLANS: dict[int, tuple[EntitySpec, list[tuple[str, FieldType, Callable[[Any], Any]]]]] = {}


def _plan(entity: EntitySpec) -> list[tuple[str, FieldType, Callable[[Any], Any]]]:
    """The fields that need decoding, worked out once per entity (this runs for every record)."""
    known = _PLANS.get(id(entity))
    if known is None or known[0] is not entity:
        known = (entity, [(name, spec.type, _DECODERS[spec.type])
                          for name, spec in entity.fields.items() if spec.type in _DECODERS])
        _PLANS[id(entity)] = known
    return known[1]


def typed_data(entity: EntitySpec, data: dict[str, Any]) -> dict[str, Any]:
    """The wire data with each field in its Python type (in place); unknown fields are kept as they are."""
    for name, kind, decode in _plan(entity):
        value = data.get(name)
        if value is not None and type(value) is not int:
            try:
                data[name] = decode(value)
            except (ValueError, TypeError, ArithmeticError) as exc:
                raise BadRecord(f"field {name!r} is not a {kind.value}: {exc}") from None
        elif kind is FieldType.DECIMAL and value is not None:
            data[name] = Decimal(value)
    return data


def parse(delivery: Delivery, entities: Mapping[str, EntitySpec]) -> Record:
    """The record in `delivery`, typed by its entity's schema; BadRecord says why not."""
    fields = delivery.fields
    try:
        event = orjson.loads(fields["event"])
        seq = int(fields["seq"])
    except KeyError as exc:
        raise BadRecord(f"entry has no {exc.args[0]!r} field: not a straw record") from None
    except (ValueError, orjson.JSONDecodeError) as exc:
        raise BadRecord(f"entry is not a straw record: {exc}") from None
    if not isinstance(event, dict):
        raise BadRecord("`event` is not a JSON object")
    entity_name, _, op = str(event.get("type", "")).rpartition(".")
    entity = entities.get(entity_name)
    if entity is None:
        raise BadRecord(f"event type {event.get('type')!r} names no entity of this configuration "
                        f"(entities: {', '.join(entities)})")
    if op not in (UPSERTED, DELETED):
        raise BadRecord(f"event type {event.get('type')!r}: unknown operation {op!r}")
    data = event.get("data")
    if not isinstance(data, dict):
        raise BadRecord("event `data` is not a JSON object")
    return Record(
        stream=delivery.stream, entry_id=delivery.entry_id, seq=seq, position=fields.get("pos", ""),
        id=str(event.get("id", "")), entity=entity_name, op=op, subject=str(event.get("subject", "")),
        data=typed_data(entity, data), event=event, raw=fields["event"], deliveries=delivery.deliveries,
        retry="retry" in fields,
    )
