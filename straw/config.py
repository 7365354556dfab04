"""The configuration model: what one straw YAML file may say, validated as a whole.

Loading (YAML, line numbers, `${VAR}` substitution) lives in `config_load`; this
module only declares shapes and cross-references, so adapters can import it
without pulling in YAML.
"""

from __future__ import annotations

import re
import socket
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _parse_duration(value: Any) -> Any:
    """Accept `5`, `2.5`, `"500ms"`, `"5s"`, `"2m"`, `"1h"`; return seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        raise PydanticCustomError(
            "duration",
            "not a duration: '{value}'; write seconds (5), or a number with ms, s, m or h ('500ms', '2m')",
            {"value": value},
        )
    return value


Seconds = Annotated[float, BeforeValidator(_parse_duration), Field(ge=0)]


class Strict(BaseModel):
    """Unknown keys are errors: a typo must not silently fall back to a default."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class FieldType(StrEnum):
    STRING = "string"
    INTEGER = "integer"
    DECIMAL = "decimal"
    BOOLEAN = "boolean"
    DATE = "date"
    DATETIME = "datetime"
    JSON = "json"


class FieldSpec(Strict):
    type: FieldType
    required: bool = Field(
        default=False, description="null is a mapping error (key fields are always required)"
    )
    scale: int | None = Field(
        default=None, ge=0, le=38, description="decimal only: digits after the point, rounded half-even"
    )


def _field_shorthand(value: Any) -> Any:
    return {"type": value} if isinstance(value, str) else value


class EntitySpec(Strict):
    key: list[str] = Field(min_length=1)
    fields: dict[str, Annotated[FieldSpec, BeforeValidator(_field_shorthand)]] = Field(min_length=1)

    @model_validator(mode="after")
    def _key_fields_declared(self) -> EntitySpec:
        missing = [k for k in self.key if k not in self.fields]
        if missing:
            # `at`: where in this model the error belongs, so the loader can name that line.
            raise PydanticCustomError(
                "key_field",
                "key field(s) {missing} are not declared under `fields`; declare them there or fix `key` "
                "(declared: {declared})",
                {"missing": ", ".join(missing), "declared": ", ".join(self.fields),
                 "at": ("key", self.key.index(missing[0]))},
            )
        return self


class ChangeMode(StrEnum):
    INCREMENTING = "incrementing"
    TIMESTAMP = "timestamp"


class DbSourceSpec(Strict):
    name: str
    kind: Literal["db"] = "db"
    url: str = Field(description="SQLAlchemy URL; put secrets in ${ENV_VAR} or ${file:/path}")
    table: str
    db_schema: str | None = Field(default=None, alias="schema")
    mode: ChangeMode
    incrementing_column: str | None = None
    timestamp_column: str | None = None
    key_column: str | None = Field(
        default=None, description="timestamp mode: unique, increasing tie-breaker for equal timestamps"
    )
    entity: str
    stream: str
    mapping: dict[str, str] = Field(
        default_factory=dict, description="entity field -> source column; unmapped fields use their own name"
    )
    timezone: str = "UTC"
    batch_size: int = Field(default=1000, ge=1, le=100_000)
    poll_interval: Seconds = 5.0
    max_rows_per_poll: int | None = Field(default=None, ge=1)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("name", "stream")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise PydanticCustomError(
                "name", "use letters, digits, '_', '.', '-' (got '{value}')", {"value": value}
            )
        return value

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise PydanticCustomError(
                "timezone", "unknown time zone '{value}'; use an IANA name such as 'Europe/Amsterdam'",
                {"value": value},
            ) from None
        return value

    @model_validator(mode="after")
    def _mode_columns(self) -> DbSourceSpec:
        if self.mode is ChangeMode.INCREMENTING and not self.incrementing_column:
            raise PydanticCustomError(
                "mode_column",
                "mode 'incrementing' needs `incrementing_column`: a column whose value only grows (an id)",
                {"at": ("mode",)},
            )
        if self.mode is ChangeMode.TIMESTAMP and not (self.timestamp_column and self.key_column):
            raise PydanticCustomError(
                "mode_column",
                "mode 'timestamp' needs `timestamp_column` (last change time) and `key_column` "
                "(unique tie-breaker, so rows sharing a timestamp are never skipped)",
                {"at": ("mode",)},
            )
        return self

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


def _default_kind(value: Any) -> Any:
    # A discriminated union requires its tag; `kind` is optional in the file, a database by default.
    if isinstance(value, dict) and "kind" not in value:
        return {**value, "kind": "db"}
    return value


SourceSpec = Annotated[DbSourceSpec, Field(discriminator="kind"), BeforeValidator(_default_kind)]


class RedisSpec(Strict):
    url: str = "redis://127.0.0.1:6379/0"
    socket_timeout: Seconds = 10.0


class OutboxSpec(Strict):
    path: Path = Path("var/outbox.db")


class RelaySpec(Strict):
    batch_size: int = Field(default=1000, ge=1, le=50_000)
    idle_interval: Seconds = 0.2
    backoff_max: Seconds = 30.0
    maxlen: int | None = Field(
        default=None, ge=1, description="approximate MAXLEN per stream; none keeps every entry"
    )


class Config(Strict):
    instance: str = Field(default_factory=lambda: socket.gethostname().split(".")[0] or "straw")
    redis: RedisSpec = RedisSpec()
    outbox: OutboxSpec = OutboxSpec()
    relay: RelaySpec = RelaySpec()
    entities: dict[str, EntitySpec] = Field(min_length=1)
    sources: list[SourceSpec] = Field(min_length=1)

    @field_validator("instance")
    @classmethod
    def _instance_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise PydanticCustomError(
                "name", "use letters, digits, '_', '.', '-' (got '{value}')", {"value": value}
            )
        return value

    @model_validator(mode="after")
    def _cross_references(self) -> Config:
        seen: set[str] = set()
        for index, source in enumerate(self.sources):
            if source.name in seen:
                raise PydanticCustomError(
                    "duplicate", "two sources are named '{name}'; names must be unique",
                    {"name": source.name, "at": ("sources", index, "name")},
                )
            seen.add(source.name)
            entity = self.entities.get(source.entity)
            if entity is None:
                raise PydanticCustomError(
                    "entity",
                    "source '{name}' names entity '{entity}', which is not declared under `entities`; "
                    "declare it there or use one of: {declared}",
                    {"name": source.name, "entity": source.entity, "declared": ", ".join(self.entities),
                     "at": ("sources", index, "entity")},
                )
            unknown = [f for f in source.mapping if f not in entity.fields]
            if unknown:
                raise PydanticCustomError(
                    "mapping",
                    "source '{name}' maps {unknown}, not a field of entity '{entity}'; "
                    "map the entity's fields ({fields}) or declare it under the entity",
                    {
                        "name": source.name,
                        "unknown": ", ".join(unknown),
                        "entity": source.entity,
                        "fields": ", ".join(entity.fields),
                        "at": ("sources", index, "mapping", unknown[0]),
                    },
                )
        return self

    def source(self, name: str) -> DbSourceSpec:
        for source in self.sources:
            if source.name == name:
                return source
        raise KeyError(name)

    @property
    def streams(self) -> list[str]:
        return sorted({s.stream for s in self.sources})
