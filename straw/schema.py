"""The JSON Schema of the configuration file, generated from the pydantic models (`straw schema`).

Editors that speak the YAML language server protocol read it from a first line
`# yaml-language-server: $schema=straw.schema.json`: keys complete with their
descriptions, and a typo or a wrong type is underlined before straw ever runs.
It describes the file as written (a duration may be `5s`, a field type `integer`
or `{type: decimal, scale: 2}`), not the values straw makes of it.
"""

from __future__ import annotations

from typing import Any

from straw.config import Config

DIALECT = "https://json-schema.org/draft/2020-12/schema"


def config_schema() -> dict[str, Any]:
    schema = Config.model_json_schema(by_alias=True, mode="validation")
    # A source host's file has `sources`, a loader host's `loaders` (Config._cross_references): one at least.
    nonempty = [{"required": [key], "properties": {key: {"minItems": 1}}} for key in ("sources", "loaders")]
    return {
        "$schema": DIALECT,
        **schema,
        "anyOf": nonempty,
        "title": "straw configuration",
    }
