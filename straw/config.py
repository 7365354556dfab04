"""The configuration model: what one straw YAML file may say, validated as a whole.

Loading (YAML, line numbers, `${VAR}` substitution) lives in `config_load`; this
module only declares shapes and cross-references, so adapters can import it
without pulling in YAML.
"""

from __future__ import annotations

import os
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

from bus.names import JetStreamOptions, bus_kind, rabbitmq_name_problem, stream_name_problem, subject_problem
from straw import sql_guard
from straw.config_loaders import AnyLoaderSpec, LoaderSpec
from straw.config_scrape import ScrapeSourceSpec
from straw.config_types import BusUrl, Encoding, ListenHost, Name, RedisUrl, Seconds, StreamName, Strict, TimeZone
from straw.schedule import Scheduled


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
    type: FieldType = Field(
        description="`string`, `integer`, `decimal`, `boolean`, `date`, `datetime`, `json` or `bytes` (base64); "
        "a field may be just its type: `paid: boolean`"
    )
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


# `order_no: integer` is short for `{type: integer}`; the JSON Schema accepts both spellings.
FieldSpecOrType = Annotated[FieldSpec, BeforeValidator(_field_shorthand, json_schema_input_type=FieldType | FieldSpec)]


class EntitySpec(Strict):
    key: list[str] = Field(
        min_length=1, description="key fields, in order (composite keys join as `a/b` in `subject`); never null",
        examples=[["order_no"]],
    )
    fields: dict[str, FieldSpecOrType] = Field(
        min_length=1, description="field name: a type name, or `{type, required, scale}`",
        examples=[{"order_no": "integer", "amount": {"type": "decimal", "scale": 2}}],
    )

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

    column: str = Field(description="the column that marks a row deleted")
    value: str | int | bool | None = Field(
        default=None, description="deleted when the column holds this (text compared trimmed; true/false as a flag)"
    )
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


class DbSourceSpec(Scheduled):
    name: Name = Field(description="unique source name; names the position, the metrics, the CloudEvents source")
    kind: Literal["db"] = Field(
        default="db", description="`db`, or `scrape` for a web UI (see [Web UI source](#web-ui-source-kind-scrape))"
    )
    url: str = Field(
        description="SQLAlchemy URL, or `odbc:<connection string or DSN=…>` (see Drivers); checked at load: a "
        "scheme, a known dialect, its driver installed. A SQLite file is opened read-only (`mode=ro`) and must "
        "exist. Secrets go in `${ENV_VAR}` or `${file:/path}`",
        examples=["postgresql+psycopg://straw:${ERP_DB_PASSWORD}@erp-db.local/erp", "sqlite:///legacy/erp.db"],
    )
    table: str | None = Field(default=None, description="the table (or view) to poll; one of `table` or `query`")
    db_schema: str | None = Field(default=None, alias="schema", description="the table's schema, if not the default")
    query: str | None = Field(
        default=None,
        description="instead of `table`: exactly one read-only SELECT (joins, views), checked at load (see "
        "[Custom `query`](#custom-query-the-rule)); may use `:last_value` and `:param`s",
    )
    params: dict[str, str | int | float | bool | None] = Field(
        default_factory=dict, description="named parameters bound into `query` (:name)"
    )
    start_value: str | int | None = Field(
        default=None, description="`:last_value` before the first row; required when `query` uses it"
    )
    mode: ChangeMode = Field(description="`incrementing`, `timestamp` or `snapshot` (see Change detection modes)")
    incrementing_column: str | None = Field(
        default=None, description="incrementing mode: a column whose value only grows (an id)"
    )
    timestamp_column: str | None = Field(default=None, description="timestamp mode: when the row last changed")
    key_column: str | None = Field(
        default=None, description="timestamp mode: unique tie-breaker for rows sharing a timestamp"
    )
    entity: str = Field(description="which entity (under `entities`) the rows become")
    stream: StreamName = Field(
        description="the stream they go to; may hold one Redis Cluster hash tag, `erp.{orders}` (quote it if it "
        "starts with `{`), to share a slot with your own `{orders}` keys (its checkpoint joins that slot)",
        examples=["erp.orders"],
    )
    mapping: dict[str, str] = Field(
        default_factory=dict,
        description="`field: column`; unmapped fields read the column of the same name (case-insensitive)",
    )
    timezone: TimeZone = Field(
        default="UTC",
        description="zone of naive timestamps; an IANA name, case-sensitive (`utc` gets \"did you mean 'UTC'\")",
        examples=["Europe/Amsterdam"],
    )
    settle_delay: Seconds = Field(
        default=0.0,
        description="a fixed settle window on the database's clock instead of `auto`: timestamp mode takes rows "
        "older than now minus this; incrementing mode never passes an id gap younger than this",
    )
    settle: Literal["auto", "off"] = Field(
        default="auto",
        description="commit-safe watermark (timestamp and incrementing mode): `auto` uses the database's technique "
        "(below, \"Late commits\"); `off` takes rows as soon as they are visible, for tables with one writer",
    )
    settle_fallback: Seconds = Field(
        default=30.0, gt=0,
        description="with `settle: auto`, the window used where the database offers no transaction horizon (ODBC, "
        "SQL Server, Oracle; MariaDB/MySQL without the PROCESS privilege)",
    )
    soft_delete: SoftDeleteSpec | None = Field(
        default=None, description="`{column, value}` or `{column, not_null: true}`: such rows are `deleted` events"
    )
    encoding: Encoding = Field(
        default="utf-8",
        description="codec for text kept in byte columns (`cp1252`, `latin-1`, …), and for all text of a "
        "PostgreSQL database created `SQL_ASCII`",
    )
    trim_char: bool = Field(default=False, description="strip trailing spaces (CHAR(n) padding) from text fields")
    statement_timeout: Seconds | None = Field(
        default=None, description="cancel a statement running longer (`30s`)"
    )
    batch_size: int = Field(default=1000, ge=1, le=100_000, description="rows per fetch and per outbox transaction")
    poll_interval: Seconds = Field(
        default=5.0,
        description="time from one poll's start to the next's (a poll that runs longer is followed this long "
        "after it ended); at least `50ms` (shorter polls the legacy database "
        "in a busy loop)",
    )
    max_rows_per_poll: int | None = Field(
        default=None, ge=1, description="cap per poll; a poll cut at the cap polls again at once (inside its window)")
    batch_bytes: int = Field(
        default=64 * 2**20, ge=2**20,
        description="a batch also closes at about this many bytes of row values (at least 1 MB; default 64 MB): "
        "peak memory follows it, not `batch_size`, when rows are wide (2 MB rows: 32 a batch)",
    )
    digest: Literal["auto", "database", "python"] = Field(
        default="auto",
        description="snapshot mode: where each row's digest is computed. `database`: PostgreSQL or MariaDB/MySQL "
        "hashes the rows, a listing reads keys and digests and then only new and changed rows in full; `python`: "
        "every row is read and hashed here; `auto`: `database` for a table keyed by its primary key (or a unique "
        "index) on those databases, else `python`. Switching reads every row once and sends nothing for unchanged "
        "ones (see Snapshot digests)",
    )
    deletes: DeletesSpec | None = Field(
        default=None,
        description="`{sweep_interval: 1h}`, timestamp and incrementing mode: a key sweep turns rows deleted from "
        "the table (hard deletes) into `deleted` events (see Hard deletes below)",
    )

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)




    @field_validator("settle", mode="before", json_schema_input_type=Literal["auto", "off", False])
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
        if self.digest != "auto" and self.mode is not ChangeMode.SNAPSHOT:
            raise PydanticCustomError(
                "digest", "`digest` applies to mode 'snapshot' only; remove it", {"at": ("digest",)}
            )
        if self.digest == "database" and (
            self.url.startswith("odbc:") or sql_guard.dialect_for(self.url) not in ("postgres", "mysql")
        ):
            raise PydanticCustomError(
                "digest",
                "`digest: database` needs PostgreSQL or MariaDB/MySQL (not through ODBC); use `auto` or `python`",
                {"at": ("digest",)},
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
    url: RedisUrl = Field(
        default="redis://127.0.0.1:6379/0",
        description="redis-py URL (`redis://`, `rediss://`, `unix://`); checked at load: a scheme, a host, a port "
        "1 to 65535 and a numeric database (`/seven` is refused, where redis-py would silently use db 0), and its "
        "query options: TLS files (`ssl_ca_certs`, `ssl_certfile`, `ssl_keyfile`, absolute and existing), "
        "`ssl_cert_reqs`, … (see [Redis over TLS](#redis-over-tls-and-acl-users)); an unknown option is an error",
        examples=["${REDIS_URL:-redis://127.0.0.1:6379/0}"],
    )
    socket_timeout: Seconds = Field(default=10.0, description="per-command timeout")


class JetStreamSpec(Strict):
    """NATS: the JetStream stream whose subjects are straw's streams; created if missing, else bound to."""

    stream: str = Field(
        default="straw", min_length=1,
        description="NATS only: the JetStream stream whose subjects are straw's streams; created if missing, else "
        "bound to (see [On NATS JetStream](#on-nats-jetstream)). No `.`, `*`, `>`, blanks or slashes")
    max_age: Seconds | None = Field(
        default=None, description="NATS, when straw creates the stream: drop messages older than this (e.g. `168h`)")
    max_bytes: int | None = Field(
        default=None, ge=1,
        description="NATS, when straw creates the stream: drop the oldest messages beyond this size")
    duplicate_window: Seconds = Field(
        default=120.0, gt=0,
        description="NATS, when straw creates the stream: how long the server remembers a `Nats-Msg-Id`")
    replicas: int = Field(
        default=1, ge=1, le=5,
        description="NATS, when straw creates the stream: copies in a JetStream cluster (1 to 5)")

    @model_validator(mode="after")
    def _nats_name(self) -> JetStreamSpec:
        problem = stream_name_problem(self.stream)
        if problem:
            raise PydanticCustomError("name", problem + "; e.g. 'straw' or 'ERP_ORDERS'", {"at": ("stream",)})
        return self

    def options(self) -> JetStreamOptions:
        return JetStreamOptions(self.stream, self.max_age, self.max_bytes, self.duplicate_window, self.replicas)


class Durability(StrEnum):
    ACK = "ack"  # the bus answered: on Redis, in the primary's memory
    REPLICATED = "replicated"  # and `replicas` replicas have it (Redis WAIT)
    FSYNC = "fsync"  # and it is on disk on the primary and `replicas` replicas (Redis WAITAOF, Redis 7.2+)


class BusSpec(Strict):
    """The bus the relay publishes to; `redis:` is the older spelling of a Redis bus."""

    url: BusUrl = Field(description="redis://, rediss://, unix:// (Redis Streams); nats://, tls:// (NATS "
                        "JetStream); rabbitmq-stream://, rabbitmq-stream+tls:// (RabbitMQ Streams)")
    socket_timeout: Seconds = Field(default=10.0, description="per-call timeout")
    jetstream: JetStreamSpec | None = Field(default=None, description="NATS only: the JetStream stream")
    durability: Durability = Field(
        default=Durability.ACK,
        description="what a publish waits for before its records count as published: `ack` (the bus answered; "
        "Redis: in the primary's memory), `replicated` (Redis: `WAIT` until `bus.replicas` replicas have it), "
        "`fsync` (Redis 7.2 or newer: `WAITAOF` until the primary and `bus.replicas` replicas have it in their "
        "append-only file; on older Redis the relay stops with one line saying so). See [When the bus loses what "
        "it acknowledged](#when-the-bus-loses-what-it-acknowledged)"
    )
    replicas: int = Field(default=1, ge=0, le=100, description="replicas that must confirm (`replicated`, `fsync`)")
    durability_timeout: Seconds = Field(
        default=5.0, description="the longest wait for them; then the publish is retried as if the bus were down "
        "(the records stay in the outbox)"
    )


    @property
    def is_nats(self) -> bool:
        return bus_kind(self.url) == "nats"

    def jetstream_options(self) -> JetStreamOptions | None:
        spec = self.jetstream or (JetStreamSpec() if self.is_nats else None)
        return spec.options() if spec else None

    @model_validator(mode="after")
    def _jetstream_for_nats(self) -> BusSpec:
        if self.jetstream is not None and not self.is_nats:
            raise PydanticCustomError(
                "bus", "`jetstream` configures a NATS bus; remove it, or make bus.url nats:// (or tls://)",
                {"at": ("jetstream",)},
            )
        return self


class RetainSpec(Strict):
    """Published records kept in the outbox, to re-publish what a bus rollback loses: the newest are kept
    while all three limits hold (each per stream)."""

    age: Seconds = Field(default=86_400.0, description="published records stay in the outbox this "
                       "long, to re-publish what a bus rollback loses; `0` keeps none")
    records: int = Field(default=1_000_000, ge=0, description="and at most this many per stream (the newest)")
    megabytes: int = Field(default=1024, ge=0, description="and at most this many MB of events per stream. The "
                           "relay prunes in the background (every 10 s, whole publish batches, never above what the "
                           "bus checkpoint holds at that moment)")


def _retain_shorthand(value: Any) -> Any:
    # `retain: 24h` is the age alone.
    return {"age": value} if isinstance(value, str | int | float) and not isinstance(value, bool) else value


class OutboxSpec(Strict):
    path: Path = Field(
        default=Path("var/outbox.db"),
        description="the outbox SQLite file (with `-wal` and `-shm` beside it); relative to the config file's folder",
    )
    retain: Annotated[RetainSpec, BeforeValidator(_retain_shorthand)] = Field(
        default=RetainSpec(), description="published records kept to repair a rollback of the bus; `24h` is the "
        "age alone (see [When the bus loses what it acknowledged](#when-the-bus-loses-what-it-acknowledged))")


class RelaySpec(Strict):
    batch_size: int = Field(default=1000, ge=1, le=50_000, description="records per atomic publish (one round trip)")
    idle_interval: Seconds = Field(
        default=0.2, description="how often an idle relay looks for new records; each outbox commit that adds "
        "records wakes it at once too (not on Windows before Python 3.12, whose pipes cannot be non-blocking)")
    backoff_max: Seconds = Field(default=30.0, description="retry ceiling while Redis is unreachable")
    maxlen: int | None = Field(
        default=None, ge=1, description="approximate `MAXLEN ~` trim per stream; none keeps every entry (NATS: "
        "the `max_msgs_per_subject` of a JetStream stream straw creates)"
    )


class MetricsSpec(Strict):
    """A Prometheus endpoint (`/metrics`) served while `straw run` runs."""

    port: int = Field(
        ge=1, le=65535,
        description="serve Prometheus metrics at `http://<host>:<port>/metrics`, `/healthz`, `/readyz`, "
        "`/status.json` and the status page `/` while `straw run` runs "
        "(see [Metrics](#metrics-health-and-the-status-page))",
    )
    # Loopback by default: an on-premises host's metrics are for its own scraper unless opened on purpose.
    host: ListenHost = Field(
        default="127.0.0.1", min_length=1,
        description="address the metrics endpoint listens on; `0.0.0.0` to let another host scrape it; an IP "
        "address or host name, checked at load",
    )


class RetentionSpec(Strict):
    """Age-based trimming of the streams (XTRIM MINID ~), beside `relay.maxlen`'s count-based one."""

    max_age: Seconds | None = Field(default=None, gt=0, description="every stream: entries older than this are trimmed "
                                          "(`XTRIM MINID ~`), at most 30 days (`720h`)")
    streams: dict[str, Seconds] = Field(
        default_factory=dict,
        description="that stream's own `max_age`, over `max_age`; a stream no source publishes to is an error")
    interval: Seconds = Field(default=60.0, ge=1.0, description="how often the relay trims (at least `1s`)")


class LogSpec(Strict):
    """How `straw run` logs; STRAW_LOG_FORMAT, when set, wins over `format`."""

    format: Literal["console", "json", "keyvalue"] = Field(
        default="console", description="`console`, `json` (one JSON object a line) or `keyvalue` (`key='value'` "
        "pairs); `STRAW_LOG_FORMAT`, when set, wins")
    polls: Literal["changes", "all"] = Field(
        default="changes", description="`changes`: a `polled` line for a poll that found something; `all`: one "
        "line for every poll, with its counts and duration")


class DatabaseSpec(Strict):
    """The connection budget of one legacy database, shared by every source whose `url` is this one."""

    url: str = Field(
        description="a database's connection budget (see [Many sources on one database]"
        "(#many-sources-on-one-database)): the `url` exactly as its sources spell it; an entry no source uses is "
        "an error"
    )
    connections: int = Field(
        default=2, ge=1, le=1000, description="the most connections straw ever holds on that database, all its "
        "sources together"
    )
    idle_connections: int = Field(
        default=1, ge=0, le=1, description="connections kept open between polls: `1`, or `0` to close each after "
        "its poll"
    )
    idle_timeout: Seconds = Field(default=60.0, description="the kept connection is closed after this long unused")


def default_node() -> str:
    return f"{socket.gethostname().split('.')[0] or 'straw'}-{os.getpid()}"


class LeaseSpec(Strict):
    """`lease:` in the file: this instance is one of an active/standby pair (or more) sharing Redis."""

    ttl: Seconds = Field(
        default=10.0, ge=0.5,
        description="one active instance per stream among those sharing this Redis; a dead or frozen holder is "
        "replaced within this time (see [Active/standby pair](#activestandby-pair)); at least `500ms`")
    node: str = Field(
        default_factory=default_node, min_length=1, max_length=200, json_schema_extra={"x-default": "`<host>-<pid>`"},
        description="this instance's node id, shown as the lease holder by `straw status`",
    )


class Config(Strict):
    instance: Name = Field(
        default_factory=lambda: socket.gethostname().split(".")[0] or "straw",
        description="part of every event's `source`: `straw/<instance>/<source>`",
        json_schema_extra={"x-default": "host name"},
    )
    redis: RedisSpec = RedisSpec()
    bus: BusSpec | None = Field(
        default=None, description="the bus; default: Redis at `redis.url`. Give `bus` or `redis`, not both"
    )
    outbox: OutboxSpec = OutboxSpec()
    relay: RelaySpec = RelaySpec()
    metrics: MetricsSpec | None = Field(default=None, description="a Prometheus endpoint; off unless given")
    lease: LeaseSpec | None = Field(default=None, description="one active instance per stream; off unless given")
    entities: dict[str, EntitySpec] = Field(
        min_length=1, description="the canonical records: each entity's key and typed fields"
    )
    sources: list[SourceSpec] = Field(
        default_factory=list,
        description="what to poll: database (`kind: db`) or web UI sources; a loader host's file may have none")
    databases: list[DatabaseSpec] = Field(
        default_factory=list, description="connection budgets; a database not listed gets the defaults"
    )
    retention: RetentionSpec = RetentionSpec()
    log: LogSpec = LogSpec()
    loaders: list[LoaderSpec] = Field(
        default_factory=list,
        description="loaders that apply streams to targets (`straw load NAME`): see [Loaders](#loaders) for their keys")


    @property
    def bus_spec(self) -> BusSpec:
        """Where the relay publishes: `bus:` if given, else the Redis of `redis:`."""
        return self.bus or BusSpec(url=self.redis.url, socket_timeout=self.redis.socket_timeout)

    @model_validator(mode="after")
    def _cross_references(self) -> Config:
        if self.bus is not None and "redis" in self.model_fields_set:
            raise PydanticCustomError(
                "bus", "both `bus` and `redis` are given; keep one (`bus.url` takes any bus, `redis.url` only Redis)",
                {"at": ("bus",)},
            )
        if self.lease is not None and bus_kind(self.bus_spec.url) != "redis":
            raise PydanticCustomError(
                "lease", "`lease` needs a Redis bus (the leases live in Redis); remove it, or publish to Redis",
                {"at": ("lease",)},
            )
        if not self.sources and not self.loaders:
            raise PydanticCustomError(
                "nothing", "no `sources` and no `loaders`: nothing to run; add a source to poll (`sources:`), or a "
                "loader to apply streams (`loaders:`)", {"at": ("sources",)},
            )
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
    def _retention_streams(self) -> Config:
        for stream in self.retention.streams:
            if stream not in self.streams:
                raise PydanticCustomError(
                    "retention", "no source publishes to stream '{stream}'; use one of: {streams}",
                    {"stream": stream, "streams": ", ".join(self.streams), "at": ("retention", "streams", stream)},
                )
        return self

    def stream_max_ages(self) -> dict[str, float]:
        """Each stream's retention age, where it has one."""
        ages = {s: self.retention.max_age for s in self.streams if self.retention.max_age}
        ages.update(self.retention.streams)
        return {stream: age for stream, age in ages.items() if age is not None}

    @model_validator(mode="after")
    def _stream_names_fit_the_bus(self) -> Config:
        """A stream name the bus cannot take is refused at load, not at the first publish."""
        kind = bus_kind(self.bus_spec.url)
        for index, source in enumerate(self.sources):
            if kind == "nats" and (problem := subject_problem(source.stream)):
                raise PydanticCustomError(
                    "name", problem + "; the stream name is the subject on NATS, e.g. 'erp.orders'",
                    {"at": ("sources", index, "stream")},
                )
            if kind == "rabbitmq" and (problem := rabbitmq_name_problem(source.stream)):
                raise PydanticCustomError(
                    "stream", "RabbitMQ cannot take this stream name: it {problem}; choose another `stream`",
                    {"problem": problem, "at": ("sources", index, "stream")},
                )
        return self

    @model_validator(mode="after")
    def _loader_references(self) -> Config:
        seen: set[str] = set()
        ports = {self.metrics.port: "`metrics.port`"} if self.metrics else {}  # `straw run` may share the host
        for index, loader in enumerate(self.loaders):
            if loader.name in seen:
                raise PydanticCustomError(
                    "duplicate", "two loaders are named '{name}'; names must be unique",
                    {"name": loader.name, "at": ("loaders", index, "name")},
                )
            seen.add(loader.name)
            if loader.metrics is not None:
                taken = ports.get(loader.metrics.port)
                if taken:
                    raise PydanticCustomError(
                        "port", "port {port} is taken by {taken}: each loader's metrics need a port of their own",
                        {"port": loader.metrics.port, "taken": taken, "at": ("loaders", index, "metrics", "port")},
                    )
                ports[loader.metrics.port] = f"loader {loader.name}"
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

    @property
    def every_stream(self) -> list[str]:
        """The sources' streams and the loaders' (a loader host has only the latter)."""
        return sorted({*self.streams, *(s for loader in self.loaders for s in loader.streams)})
