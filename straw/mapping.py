"""Raw row -> canonical record, as the configuration says.

A mapper is compiled once per source and column list into a flat list of
(field, column index, coercer), so the per-row work is one loop without lookups.
Rows that fail go to dead letters with the reason; the batch goes on.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import orjson

from straw.coerce import Coercer, coercer
from straw.config import EntitySpec
from straw.records import UPSERTED, encode_event, observed_now, subject
from straw.source import RawBatch


@dataclass(frozen=True, slots=True)
class DeadLetter:
    position: str
    reason: str
    raw: str  # the raw row as JSON text, every column


@dataclass(slots=True)
class MappedBatch:
    events: list[tuple[str, bytes]] = field(default_factory=list)  # (position, encoded event)
    dead: list[DeadLetter] = field(default_factory=list)


class MappingError(Exception):
    """The source's columns cannot serve the entity: a configuration or schema-drift problem."""


@dataclass(frozen=True, slots=True)
class _Plan:
    fields: tuple[tuple[str, int, Coercer, bool], ...]  # name, column index, coerce, required
    key_slots: tuple[int, ...]  # positions in `fields` of the key fields


class Mapper:
    def __init__(
        self,
        *,
        source_uri: str,
        source_name: str,
        entity_name: str,
        entity: EntitySpec,
        mapping: dict[str, str],
        zone: Any,
        encoding: str = "utf-8",
    ) -> None:
        self.source_uri = source_uri
        self.source_name = source_name
        self.entity_name = entity_name
        self.entity = entity
        self.columns_for = {name: mapping.get(name, name) for name in entity.fields}
        self._coercers = {name: coercer(spec, zone, encoding) for name, spec in entity.fields.items()}
        self._plans: dict[tuple[str, ...], _Plan] = {}

    def required_columns(self) -> list[str]:
        return list(dict.fromkeys(self.columns_for.values()))

    def _plan(self, columns: tuple[str, ...]) -> _Plan:
        plan = self._plans.get(columns)
        if plan is not None:
            return plan
        index = {c: i for i, c in enumerate(columns)}
        lower = {c.lower(): i for i, c in enumerate(columns)}
        slots = []
        for name, column in self.columns_for.items():
            found = index.get(column, lower.get(column.lower()))
            if found is None:
                raise MappingError(
                    f"source {self.source_name!r}: column {column!r} (for field {name!r}) is not in the result "
                    f"(columns: {', '.join(columns)}); fix `mapping` or the legacy schema"
                )
            required = self.entity.fields[name].required or name in self.entity.key
            slots.append((name, found, self._coercers[name], required))
        names = [s[0] for s in slots]
        plan = _Plan(tuple(slots), tuple(names.index(k) for k in self.entity.key))
        self._plans[columns] = plan
        return plan

    def map(self, batch: RawBatch, time: str | None = None) -> MappedBatch:
        plan = self._plan(batch.columns)
        out = MappedBatch()
        observed = time or observed_now()
        for row, position in zip(batch.rows, batch.positions, strict=True):
            data: dict[str, Any] = {}
            try:
                for name, column, coerce, required in plan.fields:
                    value = row[column]
                    if value is None:
                        if required:
                            raise ValueError(f"field {name!r} (column {self.columns_for[name]!r}) is null")
                        data[name] = None
                        continue
                    try:
                        data[name] = coerce(value)
                    except ValueError as exc:
                        raise ValueError(f"field {name!r} (column {self.columns_for[name]!r}): {exc}") from None
            except ValueError as exc:
                out.dead.append(DeadLetter(position, str(exc), raw_json(batch.columns, row)))
                continue
            key = subject(tuple(data[plan.fields[i][0]] for i in plan.key_slots))
            out.events.append(
                (
                    position,
                    encode_event(
                        source=self.source_uri,
                        entity=self.entity_name,
                        op=UPSERTED,
                        key=key,
                        position=position,
                        time=observed,
                        data=data,
                    ),
                )
            )
        return out


def raw_json(columns: tuple[str, ...], row: Any) -> str:
    """The raw row kept for the dead-letter table: every column, nothing lost to JSON."""
    return orjson.dumps(dict(zip(columns, row, strict=False)), default=_raw_default).decode()


def _raw_default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$bytes_hex": bytes(value).hex()}
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, (dt.date, dt.time, dt.timedelta)):
        return str(value)
    return repr(value)
