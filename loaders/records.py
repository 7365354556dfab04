"""A stream entry as a loader sees it: the parsed CloudEvent with typed data, and where it came from."""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, NamedTuple

import orjson

from straw.config import EntitySpec, FieldType
from straw.records import DELETED, UPSERTED


class BadRecord(ValueError):
    """An entry that is not a straw record this loader knows: it is dead-lettered, never applied."""


class Delivery(NamedTuple):
    """One stream entry handed to this consumer, as raw as the bus gives it.

    A named tuple, not a frozen dataclass: just as immutable, and built several times faster (one per entry).
    """

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


def _decimal(value: Any) -> Decimal:
    return Decimal(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else Decimal(str(value))


def _integer(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else int(value)


_DECODERS: dict[FieldType, Callable[[Any], Any]] = {
    FieldType.DECIMAL: _decimal,
    FieldType.DATETIME: _datetime,
    FieldType.DATE: dt.date.fromisoformat,
    FieldType.BYTES: lambda v: base64.b64decode(v, validate=True),
    FieldType.INTEGER: _integer,
}

# Per field type, the statement that types `v` in the generated coercer (see _coercer). The common cases are
# inline (no call for a string decimal or an int); anything else goes through the decoder above.
_INLINE: dict[FieldType, str] = {
    FieldType.DECIMAL: "Decimal(v) if v.__class__ is str else _decimal(v)",
    FieldType.INTEGER: "v if v.__class__ is int else _integer(v)",
}

Coercer = Callable[[dict[str, Any]], dict[str, Any]]
_COERCERS: dict[int, tuple[EntitySpec, Coercer]] = {}


def _coercer(entity: EntitySpec) -> Coercer:
    """A function typing an entity's wire data in place, generated once per entity.

    This runs for every record: a loop over (name, type, decoder) tuples with a call per field costs about
    twice the straight-line code, which matters at 100k records/s.
    """
    known = _COERCERS.get(id(entity))
    if known is not None and known[0] is entity:
        return known[1]
    names: dict[str, Any] = {"Decimal": Decimal, "BadRecord": BadRecord, "_decimal": _decimal,
                             "_integer": _integer}
    lines = ["def coerce(data):", "    name = kind = None", "    try:"]
    for index, (field, spec) in enumerate(entity.fields.items()):
        if spec.type not in _DECODERS:
            continue
        names[f"_d{index}"] = _DECODERS[spec.type]
        names[f"_n{index}"] = field
        names[f"_k{index}"] = spec.type.value
        expression = _INLINE.get(spec.type, f"_d{index}(v)")
        lines += [f"        v = data.get(_n{index})",
                  "        if v is not None:",
                  f"            name = _n{index}; kind = _k{index}",
                  f"            data[_n{index}] = {expression}"]
    lines += ["    except (ValueError, TypeError, ArithmeticError) as exc:",
              "        raise BadRecord(f'field {name!r} is not a {kind}: {exc}') from None",
              "    return data"]
    exec("\n".join(lines), names)  # field names are passed as values, never spliced into the code
    coerce: Coercer = names["coerce"]
    _COERCERS[id(entity)] = (entity, coerce)
    return coerce


def typed_data(entity: EntitySpec, data: dict[str, Any]) -> dict[str, Any]:
    """The wire data with each field in its Python type (in place); unknown fields are kept as they are."""
    return _coercer(entity)(data)


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
    # Positional: keywords cost a dict per record.
    return Record(
        delivery.stream, delivery.entry_id, seq, fields.get("pos", ""), str(event.get("id", "")), entity_name, op,
        str(event.get("subject", "")), _coercer(entity)(data), event, fields["event"], delivery.deliveries,
        "retry" in fields,
    )
