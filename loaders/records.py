"""A stream entry as a loader sees it: the parsed CloudEvent with typed data, and where it came from."""

from __future__ import annotations

import base64
import datetime as dt
import json
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
        _naive(value)
    return parsed


def _naive(value: Any) -> None:
    raise ValueError(f"datetime without an offset: {value!r}")


def _decimal(value: Any) -> Decimal:
    return Decimal(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else Decimal(str(value))


class _Lossy(Exception):  # not an error: a signal to parse again
    """orjson reads an integer past 64 bits as a float (12345678901234567890123 as 1.2345678901234568e+22):
    the record is parsed again with the standard library's json, which keeps every integer whole."""


_BIG = 2.0**63  # a float this large that is whole may be an integer orjson could not keep


def _integer(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float):
        if value.is_integer() and abs(value) >= _BIG:
            raise _Lossy
        if not value.is_integer():  # int() would drop the fraction: a changed value
            raise ValueError(f"{value!r} has a fraction")
    return int(value)


def _json(value: Any) -> Any:
    """A json field's value, unless orjson may have turned an integer in it into a float."""
    if value.__class__ is float:
        if abs(value) >= _BIG and value.is_integer():
            raise _Lossy
    elif value.__class__ is list:
        for item in value:
            _json(item)
    elif value.__class__ is dict:
        for item in value.values():
            _json(item)
    return value


_DECODERS: dict[FieldType, Callable[[Any], Any]] = {
    FieldType.DECIMAL: _decimal,
    FieldType.DATETIME: _datetime,
    FieldType.DATE: dt.date.fromisoformat,
    FieldType.BYTES: lambda v: base64.b64decode(v, validate=True),
    FieldType.INTEGER: _integer,
}

# Per field type, the statements that type `v` in the generated coercer (see _coercer), `{n}` the field's
# name. The common cases are inline (no call for a string decimal, an int or a datetime); anything else goes
# through the decoder above.
_INLINE: dict[FieldType, tuple[str, ...]] = {
    FieldType.DECIMAL: ("data[{n}] = Decimal(v) if v.__class__ is str else _decimal(v)",),
    FieldType.INTEGER: ("if v.__class__ is not int: data[{n}] = _integer(v)",),
    FieldType.DATETIME: ("w = fromisoformat(v)", "if w.tzinfo is None: _naive(v)", "data[{n}] = w"),
}

Coercer = Callable[[dict[str, Any]], dict[str, Any]]
_COERCERS: dict[int, tuple[EntitySpec, Coercer]] = {}
_EXACT: dict[int, tuple[EntitySpec, Coercer]] = {}


def _coercer(entity: EntitySpec, exact: bool = False) -> Coercer:
    """A function typing an entity's wire data in place, generated once per entity.

    This runs for every record: a loop over (name, type, decoder) tuples with a call per field costs about
    twice the straight-line code, which matters at 100k records/s. `exact`: for data the standard library
    parsed (every integer whole), where json fields need no look for integers orjson turned into floats.
    """
    cache = _EXACT if exact else _COERCERS
    known = cache.get(id(entity))
    if known is not None and known[0] is entity:
        return known[1]
    decoders = _DECODERS if exact else {**_DECODERS, FieldType.JSON: _json}
    typed = [(field, spec.type) for field, spec in entity.fields.items() if spec.type in decoders]
    names: dict[str, Any] = {"Decimal": Decimal, "BadRecord": BadRecord, "_decimal": _decimal,
                             "_integer": _integer, "_naive": _naive, "fromisoformat": dt.datetime.fromisoformat,
                             "_what": [(field, kind.value) for field, kind in typed]}
    lines = ["def coerce(data):", "    at = 0", "    try:"]
    for index, (field, kind) in enumerate(typed):
        names[f"_d{index}"] = decoders[kind]
        names[f"_n{index}"] = field
        lines += [f"        v = data.get(_n{index})",
                  "        if v is not None:",
                  f"            at = {index}",  # which field failed, for the message: one store, not two
                  *(f"            {line.format(n=f'_n{index}', d=f'_d{index}')}"
                    for line in _INLINE.get(kind, ("data[{n}] = {d}(v)",)))]
    lines += ["    except (ValueError, TypeError, ArithmeticError) as exc:",
              "        name, kind = _what[at]",
              "        raise BadRecord(f'field {name!r} is not a {kind}: {exc}') from None",
              "    return data"]
    exec("\n".join(lines), names)  # field names are passed as values, never spliced into the code
    coerce: Coercer = names["coerce"]
    cache[id(entity)] = (entity, coerce)
    return coerce


def typed_data(entity: EntitySpec, data: dict[str, Any]) -> dict[str, Any]:
    """The wire data with each field in its Python type (in place); unknown fields are kept as they are.
    Parsed already: an integer field's whole float past 2^63 (1e20: not straw's) is refused, not taken for an
    integer."""
    try:
        return _coercer(entity, exact=True)(data)
    except _Lossy:
        raise BadRecord("an integer field holds a float past 2^63, not an integer") from None


Kind = tuple[str, str, Coercer, EntitySpec]  # entity name, operation, the entity's coercer, the entity
_KINDS: dict[int, tuple[Mapping[str, EntitySpec], dict[str, Kind]]] = {}
_last: tuple[Mapping[str, EntitySpec] | None, dict[str, Kind]] = (None, {})  # the configuration parsed last


def _kinds(entities: Mapping[str, EntitySpec]) -> dict[str, Kind]:
    global _last
    known = _KINDS.get(id(entities))
    if known is None or known[0] is not entities:
        known = _KINDS[id(entities)] = (entities, {})
    _last = known  # one tuple, replaced whole: a second thread sees the old pair or the new one
    return known[1]


def _kind(type_: Any, entities: Mapping[str, EntitySpec]) -> Kind:
    """What an event type names: its entity (and that entity's coercer) and operation; BadRecord if nothing."""
    entity_name, _, op = str(type_ if type_ is not None else "").rpartition(".")
    entity = entities.get(entity_name)
    if entity is None:
        raise BadRecord(f"event type {type_!r} names no entity of this configuration "
                        f"(entities: {', '.join(entities)})")
    if op not in (UPSERTED, DELETED):
        raise BadRecord(f"event type {type_!r}: unknown operation {op!r}")
    kind = (entity_name, op, _coercer(entity), entity)
    if type_.__class__ is str:
        _kinds(entities)[type_] = kind
    return kind


_loads = orjson.loads


def parse(delivery: Delivery, entities: Mapping[str, EntitySpec]) -> Record:
    """The record in `delivery`, typed by its entity's schema; BadRecord says why not."""
    # One unpacking, not four attribute reads, and orjson's loads bound once: this runs for every record.
    stream, entry_id, fields, deliveries = delivery
    try:
        raw = fields["event"]
        event = _loads(raw)
        seq = int(fields["seq"])
    except KeyError as exc:
        raise BadRecord(f"entry has no {exc.args[0]!r} field: not a straw record") from None
    except (ValueError, orjson.JSONDecodeError) as exc:
        raise BadRecord(f"entry is not a straw record: {exc}") from None
    if event.__class__ is not dict:
        raise BadRecord("`event` is not a JSON object")
    # What the type names is remembered per configuration and type (a batch has a handful of types): splitting
    # and checking the type string for every record cost as much as typing a decimal field.
    type_ = event.get("type")
    last = _last
    kind = None
    if type_.__class__ is str:  # a list or an object there is not hashable: the slow path says why it is bad
        kind = (last[1] if last[0] is entities else _kinds(entities)).get(type_)
    if kind is None or entities.get(kind[0]) is not kind[3]:
        kind = _kind(type_, entities)
    entity_name, op, coerce, _ = kind
    data = event.get("data")
    if data.__class__ is not dict:
        raise BadRecord("event `data` is not a JSON object")
    event_id, subject = event.get("id", ""), event.get("subject", "")
    try:
        typed = coerce(data)
    except _Lossy:
        event, typed = _exact(raw, kind[3])
    # Positional: keywords cost a dict per record.
    return Record(
        stream, entry_id, seq, fields.get("pos", ""),
        event_id if event_id.__class__ is str else str(event_id), entity_name, op,
        subject if subject.__class__ is str else str(subject), typed, event, raw, deliveries,
        "retry" in fields,
    )


def _exact(raw: Any, entity: EntitySpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """The event parsed again, every integer whole (see `_Lossy`), and its data typed."""
    event = json.loads(raw)
    return event, typed_data(entity, event["data"])
