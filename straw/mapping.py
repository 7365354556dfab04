"""Raw row -> canonical record, as the configuration says.

A mapper is compiled once per source and column list into a flat list of
(field, column index, coercer), so the per-row work is one loop without lookups.
Rows that fail go to dead letters with the reason; the batch goes on.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from operator import itemgetter
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
    names: tuple[str, ...]
    pick: Callable[[Sequence[Any]], tuple[Any, ...]]  # the mapped columns of a row, in field order
    coercers: tuple[Coercer, ...]
    required: tuple[int, ...]  # indexes (into names) that must not be null
    key: tuple[int, ...]  # indexes (into names) of the key fields


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
            slots.append(found)
        names = tuple(self.columns_for)
        fields = self.entity.fields
        pick = itemgetter(*slots) if len(slots) > 1 else (lambda row, i=slots[0]: (row[i],))
        plan = _Plan(
            names=names,
            pick=pick,
            coercers=tuple(self._coercers[n] for n in names),
            required=tuple(i for i, n in enumerate(names) if fields[n].required or n in self.entity.key),
            key=tuple(names.index(k) for k in self.entity.key),
        )
        self._plans[columns] = plan
        return plan

    def map(self, batch: RawBatch, time: str | None = None) -> MappedBatch:
        plan = self._plan(batch.columns)
        out = MappedBatch()
        observed = time or observed_now()
        names, pick, coercers, required, key_slots = plan.names, plan.pick, plan.coercers, plan.required, plan.key
        source, entity, events = self.source_uri, self.entity_name, out.events
        for row, position in zip(batch.rows, batch.positions, strict=True):
            # The hot loop: one comprehension per row; only a failing row pays for a precise reason.
            try:
                values = [None if v is None else c(v) for c, v in zip(coercers, pick(row), strict=False)]
            except ValueError:
                values = None
            if values is None or any(values[i] is None for i in required):
                out.dead.append(DeadLetter(position, self._reason(plan, row), raw_json(batch.columns, row)))
                continue
            key = subject(tuple(values[i] for i in key_slots))
            events.append(
                (
                    position,
                    encode_event(
                        source=source,
                        entity=entity,
                        op=UPSERTED,
                        key=key,
                        position=position,
                        time=observed,
                        data=dict(zip(names, values, strict=False)),
                    ),
                )
            )
        return out

    def _reason(self, plan: _Plan, row: Sequence[Any]) -> str:
        """Why this row cannot be mapped: the first field that fails, named with its column."""
        for i, (name, coerce, value) in enumerate(zip(plan.names, plan.coercers, plan.pick(row), strict=True)):
            column = self.columns_for[name]
            if value is None:
                if i in plan.required:
                    return f"field {name!r} (column {column!r}) is null"
                continue
            try:
                coerced = coerce(value)
            except ValueError as exc:
                return f"field {name!r} (column {column!r}): {exc}"
            if coerced is None and i in plan.required:
                return f"field {name!r} (column {column!r}) is JSON null"
        return "row cannot be mapped"


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
