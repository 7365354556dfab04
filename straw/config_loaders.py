"""The `loaders:` section: the far end of the straw, which applies streams to target systems."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from straw.config_types import ListenHost, Name, Seconds, StreamName, Strict


class LoaderMetricsSpec(Strict):
    """A Prometheus endpoint (`/metrics`) served while `straw load` runs this loader."""

    port: int = Field(ge=1, le=65535, description="serve the loader's metrics at `http://<host>:<port>/metrics`; "
                      "a port of its own (not `metrics.port`, not another loader's)")
    host: ListenHost = Field(default="127.0.0.1", min_length=1,
                             description="address it listens on; `0.0.0.0` to let another host scrape it")


class _LoaderBase(Strict):
    name: Name
    streams: list[StreamName] = Field(min_length=1, description="streams to apply; each record's entity from its type")
    group: Name | None = Field(default=None, description="consumer group; default: the loader's name")
    start: Literal["begin", "end"] = Field(
        default="begin", description="where a new group starts: the stream's first entry, or only new ones ($)"
    )
    batch_size: int = Field(default=500, ge=1, le=50_000)
    block: Seconds = Field(
        default=2.0, description="longest wait of one read for new entries (XREADGROUP BLOCK, a JetStream fetch)")
    max_deliveries: int = Field(default=5, ge=1, le=1000)
    claim_idle: Seconds = Field(default=60.0, gt=0, description="reclaim entries pending this long (dead consumer)")
    dead_letter_stream: str = Field(
        default="{stream}.dlq", description="where records go after max_deliveries; {stream} is the source stream"
    )
    metrics: LoaderMetricsSpec | None = Field(
        default=None, description="a Prometheus endpoint while `straw load` runs; off unless given")

    @model_validator(mode="after")
    def _dead_letter_template(self) -> _LoaderBase:
        if "{stream}" not in self.dead_letter_stream and len(self.streams) > 1:
            raise PydanticCustomError(
                "dead_letter_stream",
                "with several streams, `dead_letter_stream` must contain {placeholder} (e.g. '{placeholder}.dlq'), "
                "or the dead letters of all streams mix in one",
                {"placeholder": "{stream}", "at": ("dead_letter_stream",)},
            )
        if len(set(self.streams)) != len(self.streams):
            raise PydanticCustomError("streams", "a stream is listed twice; list each once", {"at": ("streams",)})
        return self

    @property
    def group_name(self) -> str:
        return self.group or self.name

    def dead_letters_of(self, stream: str) -> str:
        return self.dead_letter_stream.replace("{stream}", stream)


class SqlLoaderSpec(_LoaderBase):
    kind: Literal["sql"]
    url: str = Field(description="SQLAlchemy URL of the target database; secrets in ${ENV_VAR}")
    create_tables: bool = Field(default=False, description="create missing tables and add new fields as columns")
    tables: dict[str, str] = Field(default_factory=dict, description="entity -> target table (default: its name)")
    db_schema: str | None = Field(default=None, alias="schema", description="schema of the target tables")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def table_of(self, entity: str) -> str:
        return self.tables.get(entity, entity)


class JsonlLoaderSpec(_LoaderBase):
    kind: Literal["jsonl"]
    directory: Path = Field(description="where the files go (relative: to the configuration file's folder)")
    max_bytes: int = Field(default=64 * 2**20, ge=1024, description="a file is closed at about this size")


LoaderSpec = Annotated[SqlLoaderSpec | JsonlLoaderSpec, Field(discriminator="kind")]
AnyLoaderSpec = SqlLoaderSpec | JsonlLoaderSpec
