"""`straw schema`: the JSON Schema accepts every configuration straw documents and ships, and flags typos.

Editors validate with it, so it must not underline a valid file (every README example,
every fixture, every `discover` draft) and must underline the mistakes the loader refuses.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from straw.config_types import _DURATION, _UNIT_SECONDS, MAX_SECONDS, Seconds
from straw.schema import config_schema
from tests.helpers import orders_config
from tests.test_cli import invoke

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = config_schema()


def _validator(schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


FULL = _validator(SCHEMA)
# A README fragment: some top keys (neither `required` nor "sources or loaders" holds for a part).
PART = _validator({k: v for k, v in SCHEMA.items() if k not in ("required", "anyOf")})


def _errors(validator: jsonschema.Draft202012Validator, document: Any) -> list[str]:
    found = []
    for error in validator.iter_errors(document):
        best = jsonschema.exceptions.best_match(error.context or [error])  # inside a oneOf: the nearest branch
        found.append(f"{'/'.join(map(str, error.absolute_path))}: {best.message} at {list(best.absolute_path)}")
    return found


# One source's keys, none required: a README fragment that shows a few keys of a source (`url: odbc:…`).
SOURCE_KEYS = _validator({**{k: v for k, v in SCHEMA.items() if k not in ("properties", "required", "type", "anyOf")},
                          "$defs": {**SCHEMA["$defs"], "DbSourceSpec": {
                              k: v for k, v in SCHEMA["$defs"]["DbSourceSpec"].items() if k != "required"}},
                          "$ref": "#/$defs/DbSourceSpec", "additionalProperties": True})


def _json_keys(value: Any) -> Any:
    """As JSON (and an editor) sees YAML: every key a string (`true:` is 'true')."""
    if isinstance(value, dict):
        return {(str(k).lower() if isinstance(k, bool) else str(k)): _json_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_keys(v) for v in value]
    return value


def readme_examples() -> list[Any]:
    text = (ROOT / "README.md").read_text()
    return [_json_keys(yaml.safe_load(block)) for block in re.findall(r"```yaml\n(.*?)```", text, re.S)]


def test_the_schema_is_valid_json_schema_and_straw_schema_prints_it() -> None:
    result = invoke("schema")
    assert result.exit_code == 0
    printed = orjson.loads(result.stdout)
    assert printed == orjson.loads(orjson.dumps(SCHEMA))
    assert printed["$schema"].startswith("https://json-schema.org/draft/2020-12")
    source = printed["$defs"]["DbSourceSpec"]["properties"]
    assert source["poll_interval"]["description"] and "5s" in source["poll_interval"]["examples"]


@pytest.mark.parametrize("index", range(len(readme_examples())))
def test_every_readme_example_validates(index: int) -> None:
    example = readme_examples()[index]
    if isinstance(example, list):  # a fragment: sources as they sit under `sources:`
        errors = _errors(PART, {"sources": example})
    elif {"entities", "sources"} <= set(example):
        errors = _errors(FULL, example)
    elif not set(example) & set(SCHEMA["properties"]):
        errors = _errors(SOURCE_KEYS, example)
    else:
        errors = _errors(PART, example)
    assert errors == []


def test_every_fixture_config_validates(tmp_path: Path) -> None:
    assert _errors(FULL, yaml.safe_load((ROOT / "fixtures" / "demo.yaml").read_text())) == []
    written = orders_config(tmp_path, db_url="sqlite:///x.db", redis_url="redis://127.0.0.1:6379/0", stream="s",
                            mode="timestamp", soft_delete={"column": "STATUS", "value": "CANCELLED"},
                            deletes={"sweep_interval": "1h"})
    assert _errors(FULL, yaml.safe_load(written.read_text())) == []
    settle_off = written.read_text().replace("mode: timestamp", "mode: timestamp\n  settle: off")  # YAML 1.1: false
    assert _errors(FULL, yaml.safe_load(settle_off)) == []


def test_a_discover_draft_validates(tmp_path: Path) -> None:
    from sqlalchemy import create_engine

    from fixtures.legacy_shapes import create_shapes

    url = f"sqlite:///{tmp_path / 'legacy.db'}"
    create_shapes(create_engine(url))
    drafted = invoke("discover", url, "--tables", "INVOICES,CUSTOMERS,AUDIT_LOG,V_OPEN_INVOICES")
    assert drafted.exit_code == 0
    assert _errors(FULL, yaml.safe_load(drafted.stdout)) == []


def _demo() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "fixtures" / "demo.yaml").read_text())
    return loaded


@pytest.mark.parametrize("mistake, where", [
    (lambda c: c["sources"][0].update(batchsize=10), "sources/0"),  # a typo of batch_size
    (lambda c: c["sources"][0].update(mode="timestamps"), "sources/0"),
    (lambda c: c["sources"][0].update(poll_interval="5 seconds"), "sources/0"),
    (lambda c: c.update(relais={"batch_size": 1}), ""),
    (lambda c: c["redis"].update(socket_timeout=-1), "redis/socket_timeout"),
    (lambda c: next(iter(c["entities"].values()))["fields"].update(x="integr"), "entities"),
    (lambda c: (c.pop("sources"), c.pop("loaders")), ""),  # the demo has both: one of them is enough
    (lambda c: c.update(sources=[], loaders=[]), ""),
])
def test_a_mistake_is_flagged(mistake: Any, where: str) -> None:
    config = _demo()
    assert _errors(FULL, config) == []
    mistake(config)
    errors = _errors(FULL, config)
    assert errors and any(e.startswith(where) for e in errors), errors


@given(st.one_of(st.text(max_size=12), st.from_regex(r"\A\s*\d{1,8}(\.\d{1,3})?\s*(ms|s|m|h)?\s*\Z")))
def test_the_schema_and_the_loader_agree_on_durations(text: str) -> None:
    from pydantic import TypeAdapter

    try:
        TypeAdapter(Seconds).validate_python(text)
        loader = True
    except ValidationError:
        loader = False
    in_schema = _errors(PART, {"relay": {"idle_interval": text}}) == []
    # An editor may let a too-long duration pass (its bound is checked at load), never flag a valid one.
    assert in_schema or not loader
    if in_schema and not loader:
        match = _DURATION.match(text)
        assert match is not None and float(match[1]) * _UNIT_SECONDS[match[2]] > MAX_SECONDS


def test_a_loader_hosts_file_validates_and_one_with_neither_does_not() -> None:
    host = {"entities": _demo()["entities"], "loaders": [
        {"name": "wh", "kind": "sql", "url": "sqlite:///t.db", "streams": ["s"], "metrics": {"port": 9110}}]}
    assert _errors(FULL, host) == []
    assert _errors(FULL, {**host, "loaders": []})
