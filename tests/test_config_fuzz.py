"""Mutated configurations: a valid one or one clear error with `file:line`, never a traceback.

Hypothesis mutates the valid BASE of test_config.py: keys deleted, renamed or added,
values replaced by other types (huge numbers, NaN, nested lists, text with control
characters), YAML structure broken, bytes in other encodings, sizes blown up. The
loader runs in-process for speed; a few cases go through `straw check` as a process.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from straw.config import Config
from straw.config_load import ConfigError, load_config, parse_config
from tests.test_cli import run_straw
from tests.test_config import BASE

FILE = Path("/nonexistent/straw.yaml")  # parse_config reads nothing from it: relative paths only anchor on it
BASE_DATA: dict[str, Any] = yaml.safe_load(BASE)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(["", "0", "-1", "yes", "5 minutes", "${NOPE}", "${file:/nope}", "${", "}", "utc", "0ms",
                     "127.0.0.1:6379", "redis://h/seven", "sqlite:///", "x" * 5000, "\u0000", "é", "{a}", "::"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=8)


def paths(data: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(data, dict):
        for key, value in data.items():
            found += paths(value, (*prefix, key))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            found += paths(value, (*prefix, index))
    return found


ALL_PATHS = paths(BASE_DATA)
YAML_PIECES = [":", "- ", "\t", "  ", "{", "[", "&a", "*a", "!!python/object:os.system", "'", '"', "%", "@", "`",
               "\n  ", "<<: *a", "? ", "---\n", "...\n", "\ufeff", "\x1f", "\x85"]


def mutate(data: dict[str, Any], path: tuple[Any, ...], how: str, value: Any, name: str) -> dict[str, Any]:
    data = copy.deepcopy(data)
    parent: Any = data
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    if how == "delete":
        del parent[last]
    elif how == "replace":
        parent[last] = value
    elif how == "rename" and isinstance(parent, dict):
        parent[name] = parent.pop(last)
    elif how == "add" and isinstance(parent, dict):
        parent[name] = value
    elif how == "wrap":
        parent[last] = [parent[last]]
    return data


def assert_clear(load: Any, yaml_parsed: bool) -> None:
    """Loading gives a Config or a ConfigError whose every line names the file (and a line, when YAML parsed)."""
    try:
        config = load()
    except ConfigError as exc:
        assert exc.problems
        for problem in exc.problems:
            text = str(problem)
            assert "Traceback" not in text and "\n" not in text.strip(), text
            assert problem.message.strip(), text
            if yaml_parsed:
                assert problem.line is not None, text
        return
    assert isinstance(config, Config)


def parses_as_mapping(text: str) -> bool:
    try:
        return isinstance(yaml.safe_load(text), dict)
    except yaml.YAMLError:
        return False


def _mutated_keys_and_values(base: dict[str, Any], path: tuple[Any, ...], how: str, value: Any, name: str) -> None:
    data = mutate(base, path, how, value, name)
    text = yaml.safe_dump(data, allow_unicode=True)
    assert_clear(lambda: parse_config(text, FILE), yaml_parsed=True)


HOW = st.sampled_from(["delete", "replace", "rename", "add", "wrap"])


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(ALL_PATHS), how=HOW, value=values, name=st.text(max_size=12))
def test_mutated_keys_and_values(path: tuple[Any, ...], how: str, value: Any, name: str) -> None:
    _mutated_keys_and_values(BASE_DATA, path, how, value, name)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    position=st.integers(min_value=0, max_value=len(BASE)),
    cut=st.integers(min_value=0, max_value=40),
    insert=st.one_of(st.text(max_size=12), st.sampled_from(YAML_PIECES)),
)
def test_mutated_yaml_text(position: int, cut: int, insert: str) -> None:
    text = BASE[:position] + insert + BASE[position + cut:]
    assert_clear(lambda: parse_config(text, FILE), yaml_parsed=parses_as_mapping(text))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    encoding=st.sampled_from(["utf-16", "utf-32", "cp1252", "latin-1", "utf-8-sig", "shift_jis"]),
    extra=st.text(alphabet="éüßçñ€", max_size=5),
    garbage=st.binary(max_size=8),
)
def test_other_encodings_and_bytes(tmp_path_factory: Any, encoding: str, extra: str, garbage: bytes) -> None:
    path = tmp_path_factory.mktemp("enc") / "straw.yaml"
    raw = BASE.replace("customer: CUST_NAME", f"customer: CUST_{extra or 'NAME'}").encode(encoding, "replace")
    path.write_bytes(raw[:40] + garbage + raw[40:])
    try:
        text = path.read_bytes().decode("utf-8")
        parsed = parses_as_mapping(text)
    except UnicodeDecodeError:
        parsed = False
    assert_clear(lambda: load_config(path), yaml_parsed=parsed)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(copies=st.integers(min_value=1, max_value=2000), value=st.sampled_from(["x", "1e308", "-1", "[]"]))
def test_sizes(copies: int, value: str) -> None:
    many = "".join(f"      f{n}: {value}\n" for n in range(copies))
    text = BASE.replace("      customer: CUST_NAME\n", "      customer: CUST_NAME\n" + many)
    assert_clear(lambda: parse_config(text, FILE), yaml_parsed=True)
    deep = BASE.replace("poll_interval: 5s", "poll_interval: " + "[" * min(copies, 500) + "]" * min(copies, 500))
    assert_clear(lambda: parse_config(deep, FILE), yaml_parsed=parses_as_mapping(deep))


def test_nan_and_huge_numbers() -> None:
    for value in (math.nan, math.inf, -math.inf, 10**400, -(10**400), 1e-320):
        for key in ("poll_interval", "batch_size", "max_rows_per_poll", "statement_timeout", "settle_delay"):
            data = mutate(BASE_DATA, ("sources", 0, key), "replace", value, "")
            assert_clear(lambda d=data: parse_config(yaml.safe_dump(d), FILE), yaml_parsed=True)


CLI_CASES = {
    "duplicate key": BASE.replace("    table: ORDERS\n", "    table: ORDERS\n    table: ORDERS\n"),
    "redis without scheme": BASE.replace("redis://127.0.0.1:6379/0", "127.0.0.1:6379"),
    "python tag": BASE.replace("mode: incrementing", "mode: !!python/object/apply:os.system [echo hi]"),
    "nan interval": BASE.replace("poll_interval: 5s", "poll_interval: .nan"),
}


def test_a_few_mutations_through_the_command_line(tmp_path: Path) -> None:
    for name, text in CLI_CASES.items():
        path = tmp_path / "straw.yaml"
        path.write_text(text)
        ran = run_straw("check", "--config", str(path))
        assert ran.returncode == 2, (name, ran.stdout, ran.stderr)
        assert "Traceback" not in ran.stdout + ran.stderr, name
        assert f"{path}:" in ran.stderr, (name, ran.stderr)
    (tmp_path / "bad.yaml").write_bytes(BASE.encode("utf-16"))
    ran = run_straw("check", "--config", str(tmp_path / "bad.yaml"))
    assert ran.returncode == 2 and "Traceback" not in ran.stderr and "UTF-8" in ran.stderr


# A loader host's file: entities and loaders, no sources (each loader kind, metrics, tables, a secret URL).
LOADER_BASE = yaml.safe_dump({
    "instance": "dwh",
    "redis": {"url": "redis://127.0.0.1:6379/0"},
    "entities": BASE_DATA["entities"],
    "metrics": {"port": 9108},
    "loaders": [
        {"name": "wh", "kind": "sql", "url": "postgresql+psycopg://loader:${NOPE:-pw}@dwh.local/erp",
         "streams": ["erp.orders"], "group": "warehouse", "create_tables": True,
         "tables": {next(iter(BASE_DATA["entities"])): "orders"}, "batch_size": 500, "max_deliveries": 5,
         "claim_idle": "60s", "metrics": {"port": 9110, "host": "127.0.0.1"}},
        {"name": "drop", "kind": "jsonl", "directory": "out", "streams": ["erp.orders", "erp.customers"],
         "dead_letter_stream": "{stream}.dead", "max_bytes": 1048576, "block": "200ms"},
    ],
}, sort_keys=False)
LOADER_DATA: dict[str, Any] = yaml.safe_load(LOADER_BASE)
LOADER_PATHS = paths(LOADER_DATA)


def test_the_loader_base_is_valid() -> None:
    config = parse_config(LOADER_BASE, FILE)
    assert [loader.name for loader in config.loaders] == ["wh", "drop"] and not config.sources


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(LOADER_PATHS), how=HOW, value=values, name=st.text(max_size=12))
def test_mutated_loader_hosts_file(path: tuple[Any, ...], how: str, value: Any, name: str) -> None:
    _mutated_keys_and_values(LOADER_DATA, path, how, value, name)
