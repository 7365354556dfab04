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
from zoneinfo import ZoneInfo

from pydantic import (
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from straw import sql_guard
from straw.config_loaders import AnyLoaderSpec, LoaderSpec
from straw.config_scrape import ScrapeSourceSpec
from straw.config_types import Encoding, ListenHost, Name, RedisUrl, Seconds, StreamName, Strict, TimeZone


class FieldType(StrEnum):
    STRING = "string"
    INTEGER = "integer"
    DECIMAL = "decimal"
    BOOLEAN = "boolean"
    DATE = "date"
    DATETIME = "datetime"
    JSON = "json"
    BYTES = "bytes"


class FieldSpec(Strict):
    type: FieldType
    required: bool = Field(
        default=False, description="null is a mapping error (key fields are always required)"
    )
    scale: int | None = Field(
        default=None, ge=0, le=38, description="decimal only: digits after the point, rounded half-even"
    )


    @model_validator(mode="after")
    def _scale_for_decimals(self) -> FieldSpec:
        if self.scale is not None and self.type is not FieldType.DECIMAL:
            raise PydanticCustomError(
                "scale", "`scale` applies to type 'decimal' only (this field is '{type}'); remove it",
                {"type": self.type.value, "at": ("scale",)},
            )
        return self


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
    SNAPSHOT = "snapshot"


class SoftDeleteSpec(Strict):
    """A row whose `column` holds `value` (or, with `not_null`, any value) is a `deleted` event."""

    column: str
    value: str | int | bool | None = None
    not_null: bool = Field(default=False, description="deleted when the column is not null (a DELETED_AT)")

    @model_validator(mode="after")
    def _one_rule(self) -> SoftDeleteSpec:
        if (self.value is None) == (not self.not_null):
            raise PydanticCustomError(
                "soft_delete",
                "give exactly one of `value` (e.g. value: 'J') or `not_null: true`",
                {"at": ("column",)},
            )
        return self


class DeletesSpec(Strict):
    """Hard deletes in `timestamp`/`incrementing` mode: list the keys now and then, delete the vanished."""

    sweep_interval: Seconds = Field(
        description="at most one key sweep per interval (e.g. 1h); keys straw delivered that the table no "
        "longer has become `deleted` events"
    )


_LAST_VALUE = re.compile(r"(?<![:\w]):last_value\b")


# Each change mode's own columns; another mode's column is a mistake, not something to ignore.
_MODE_COLUMNS = ("incrementing_column", "timestamp_column", "key_column")
_MODE_COLUMNS_OF = {
    ChangeMode.INCREMENTING: ("incrementing_column",),
    ChangeMode.TIMESTAMP: ("timestamp_column", "key_column"),
    ChangeMode.SNAPSHOT: (),
}
MIN_POLL_INTERVAL = 0.05  # seconds


class DbSourceSpec(Strict):
    name: Name
    kind: Literal["db"] = "db"
    url: str = Field(description="SQLAlchemy URL; put secrets in ${ENV_VAR} or ${file:/path}")
    table: str | None = None
    db_schema: str | None = Field(default=None, alias="schema")
    query: str | None = Field(
        default=None, description="instead of `table`: a SELECT (joins, views); may use :last_value and `params`"
    )
    params: dict[str, str | int | float | bool | None] = Field(
        default_factory=dict, description="named parameters bound into `query` (:name)"
    )
    start_value: str | int | None = Field(
        default=None, description="bound as :last_value before the first row has been read"
    )
    mode: ChangeMode
    incrementing_column: str | None = None
    timestamp_column: str | None = None
    key_column: str | None = Field(
        default=None, description="timestamp mode: unique, increasing tie-breaker for equal timestamps"
    )
    entity: str
    stream: StreamName
    mapping: dict[str, str] = Field(
        default_factory=dict, description="entity field -> source column; unmapped fields use their own name"
    )
    timezone: TimeZone = "UTC"
    settle_delay: Seconds = Field(
        default=0.0,
        description="a fixed settle window on the database's clock instead of `settle: auto` (0: auto decides)",
    )
    settle: Literal["auto", "off"] = Field(
        default="auto",
        description="commit-safe watermark: auto picks the database's technique; off for single-writer tables",
    )
    settle_fallback: Seconds = Field(
        default=30.0, gt=0,
        description="settle: auto, where the database offers no transaction horizon (ODBC, no PROCESS privilege)",
    )
    soft_delete: SoftDeleteSpec | None = None
    encoding: Encoding = Field(default="utf-8", description="how text kept in byte columns is encoded (cp1252…)")
    trim_char: bool = Field(default=False, description="strip the trailing spaces that CHAR(n) columns pad with")
    statement_timeout: Seconds | None = Field(default=None, description="cancel a read running longer")
    batch_size: int = Field(default=1000, ge=1, le=100_000)
    poll_interval: Seconds = 5.0
    max_rows_per_poll: int | None = Field(default=None, ge=1)
    batch_bytes: int = Field(
        default=64 * 2**20, ge=2**20, description="a batch also closes at about this many bytes of row values"
    )
    deletes: DeletesSpec | None = Field(default=None, description="a key sweep for hard deletes (not snapshot)")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)




    @field_validator("settle", mode="before")
    @classmethod
    def _settle_off(cls, value: Any) -> Any:
        return "off" if value is False else value  # YAML 1.1 reads a bare `off` as false

    @model_validator(mode="after")
    def _table_or_query(self) -> DbSourceSpec:
        if (self.table is None) == (self.query is None):
            raise PydanticCustomError(
                "table_or_query",
                "give exactly one of `table` (a table or view name) or `query` (a SELECT for joins)",
                {"at": ("query",) if self.query is not None else ()},
            )
        if self.uses_last_value:
            if self.mode is ChangeMode.SNAPSHOT:
                raise PydanticCustomError(
                    "last_value", "mode 'snapshot' reads the whole result each time; remove :last_value from `query`",
                    {"at": ("query",)},
                )
            if self.start_value is None:
                raise PydanticCustomError(
                    "start_value",
                    "`query` uses :last_value; set `start_value`, the value it takes before the first row "
                    "(e.g. 0, or '1900-01-01 00:00:00')",
                    {"at": ("query",)},
                )
        if self.settle_delay and self.mode is ChangeMode.SNAPSHOT:
            raise PydanticCustomError(
                "settle_delay", "`settle_delay` applies to modes 'timestamp' and 'incrementing' only",
                {"at": ("settle_delay",)},
            )
        if self.settle_delay and self.settle == "off":
            raise PydanticCustomError(
                "settle_delay", "`settle: off` takes rows at once; remove `settle_delay` or `settle: off`",
                {"at": ("settle",)},
            )
        return self

    @model_validator(mode="after")
    def _mode_columns(self) -> DbSourceSpec:
        if self.mode is ChangeMode.INCREMENTING and not self.incrementing_column:
            raise PydanticCustomError(
                "mode_column",
                "mode 'incrementing' needs `incrementing_column`: a column whose value only grows (an id)",
                {"at": ("mode",)},
            )
        foreign = [k for k in _MODE_COLUMNS if k not in _MODE_COLUMNS_OF[self.mode] and getattr(self, k) is not None]
        if foreign:
            owner = next(m for m, keys in _MODE_COLUMNS_OF.items() if foreign[0] in keys)
            raise PydanticCustomError(
                "mode_column",
                "`{key}` applies to mode '{owner}' only, and this source's mode is '{mode}'; remove it",
                {"key": foreign[0], "owner": owner.value, "mode": self.mode.value, "at": (foreign[0],)},
            )
        if self.mode is ChangeMode.TIMESTAMP and not (self.timestamp_column and self.key_column):
            raise PydanticCustomError(
                "mode_column",
                "mode 'timestamp' needs `timestamp_column` (last change time) and `key_column` "
                "(unique tie-breaker, so rows sharing a timestamp are never skipped)",
                {"at": ("mode",)},
            )
        if self.deletes is not None and self.mode is ChangeMode.SNAPSHOT:
            raise PydanticCustomError(
                "deletes", "mode 'snapshot' sees deleted rows by itself; remove `deletes`", {"at": ("deletes",)}
            )
        return self

    @model_validator(mode="after")
    def _read_only_query(self) -> DbSourceSpec:
        # Refused here, at load, so no text that could escape the read-only session ever reaches a database.
        reason = None if self.query is None else sql_guard.refusal(self.query, sql_guard.dialect_for(self.url))
        if reason:
            raise PydanticCustomError("query", "the query {reason}", {"reason": reason, "at": ("query",)})
        return self

    @model_validator(mode="after")
    def _poll_interval_floor(self) -> DbSourceSpec:
        if self.poll_interval < MIN_POLL_INTERVAL:
            raise PydanticCustomError(
                "poll_interval",
                "at least {floor} ms: a shorter interval polls the legacy database in a busy loop; write e.g. 1s",
                {"floor": round(MIN_POLL_INTERVAL * 1000), "at": ("poll_interval",)},
            )
        return self

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def uses_last_value(self) -> bool:
        """`query` refers to :last_value, the watermark of the previous read."""
        return self.query is not None and _LAST_VALUE.search(self.query) is not None


def _default_kind(value: Any) -> Any:
    # A discriminated union requires its tag; `kind` is optional in the file, a database by default.
    if isinstance(value, dict) and "kind" not in value:
        return {**value, "kind": "db"}
    return value


SourceSpec = Annotated[
    DbSourceSpec | ScrapeSourceSpec, Field(discriminator="kind"), BeforeValidator(_default_kind)
]
AnySourceSpec = DbSourceSpec | ScrapeSourceSpec


class RedisSpec(Strict):
    url: RedisUrl = "redis://127.0.0.1:6379/0"
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


class MetricsSpec(Strict):
    """A Prometheus endpoint (`/metrics`) served while `straw run` runs."""

    port: int = Field(ge=1, le=65535)
    # Loopback by default: an on-premises host's metrics are for its own scraper unless opened on purpose.
    host: ListenHost = Field(default="127.0.0.1", min_length=1, description="address to listen on; 0.0.0.0 for all")


class DatabaseSpec(Strict):
    """The connection budget of one legacy database, shared by every source whose `url` is this one."""

    url: str = Field(description="exactly as the sources spell it (after ${VAR} substitution)")
    connections: int = Field(default=2, ge=1, le=1000, description="most connections straw ever holds on it")
    idle_connections: int = Field(default=1, ge=0, le=1, description="kept open between polls: 1 or 0")
    idle_timeout: Seconds = Field(default=60.0, description="close the kept connection after this long unused")


class Config(Strict):
    instance: Name = Field(default_factory=lambda: socket.gethostname().split(".")[0] or "straw")
    redis: RedisSpec = RedisSpec()
    outbox: OutboxSpec = OutboxSpec()
    relay: RelaySpec = RelaySpec()
    metrics: MetricsSpec | None = Field(default=None, description="off unless given")
    entities: dict[str, EntitySpec] = Field(min_length=1)
    sources: list[SourceSpec] = Field(min_length=1)
    databases: list[DatabaseSpec] = Field(
        default_factory=list, description="connection budgets; a database not listed gets the defaults"
    )
    loaders: list[LoaderSpec] = Field(default_factory=list, description="apply streams to targets (straw load)")


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

    @model_validator(mode="after")
    def _databases_used(self) -> Config:
        urls = {s.url for s in self.sources if isinstance(s, DbSourceSpec)}
        seen: set[str] = set()
        for index, database in enumerate(self.databases):
            # The URL itself is never quoted: it may hold a password.
            if database.url in seen:
                raise PydanticCustomError(
                    "database", "this database is listed twice under `databases`; merge the two entries",
                    {"at": ("databases", index, "url")},
                )
            seen.add(database.url)
            if database.url not in urls:
                raise PydanticCustomError(
                    "database", "no database source has this `url`; spell it exactly as the sources do",
                    {"at": ("databases", index, "url")},
                )
        return self

    @model_validator(mode="after")
    def _loader_references(self) -> Config:
        seen: set[str] = set()
        for index, loader in enumerate(self.loaders):
            if loader.name in seen:
                raise PydanticCustomError(
                    "duplicate", "two loaders are named '{name}'; names must be unique",
                    {"name": loader.name, "at": ("loaders", index, "name")},
                )
            seen.add(loader.name)
            for entity in getattr(loader, "tables", {}):
                if entity not in self.entities:
                    raise PydanticCustomError(
                        "entity", "`tables` names entity '{entity}', which is not declared under `entities`; "
                        "use one of: {declared}",
                        {"entity": entity, "declared": ", ".join(self.entities),
                         "at": ("loaders", index, "tables", entity)},
                    )
        return self

    def loader(self, name: str) -> AnyLoaderSpec:
        for loader in self.loaders:
            if loader.name == name:
                return loader
        raise KeyError(name)

    def database(self, url: str) -> DatabaseSpec:
        """The budget of the database at `url`: its `databases` entry, or the defaults."""
        for database in self.databases:
            if database.url == url:
                return database
        return DatabaseSpec(url=url)

    def source(self, name: str) -> AnySourceSpec:
        for source in self.sources:
            if source.name == name:
                return source
        raise KeyError(name)

    @property
    def streams(self) -> list[str]:
        return sorted({s.stream for s in self.sources})
