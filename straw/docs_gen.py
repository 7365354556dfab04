"""The README's key tables, generated from the configuration models: docs that cannot drift.

Each table sits between marker comments, `<!-- keys:NAME -->` and `<!-- /keys -->`;
everything between them is replaced, nothing outside is touched, so prose around a
table stays hand-written. A row is a key (its path in the file), its default and its
meaning, which is the field's `description` in the model: a key added to a model
without one fails `--check` (and the test that runs it).

    python -m straw.docs_gen           # rewrite the tables in README.md
    python -m straw.docs_gen --check   # exit 1 if README.md and the models disagree
"""

from __future__ import annotations

import argparse
import enum
import re
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, WithJsonSchema
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from straw.config import Config, DbSourceSpec
from straw.config_scrape import Locator, ScrapeSourceSpec
from straw.config_types import _DURATION_SCHEMA

README = Path(__file__).resolve().parent.parent / "README.md"
_BLOCK = re.compile(r"(<!-- keys:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /keys -->)", re.S)
# What `x-default` in a field's json_schema_extra says instead of the value (a default computed at run time).
DEFAULT_TEXT = "x-default"


@dataclass(frozen=True)
class TableSpec:
    model: type[BaseModel]
    prefix: str = ""
    # Where a field holds a union of models (sources: db or scrape), the one this table documents.
    choose: tuple[tuple[str, type[BaseModel]], ...] = ()
    skip: frozenset[str] = frozenset()


_SINGULAR = {"entities": "entity"}
# Models shown as one key (a selector is `css` text or `{xpath: …}`), not key by key.
_LEAVES: tuple[type[BaseModel], ...] = (Locator,)

TABLES: dict[str, TableSpec] = {
    "config": TableSpec(Config, choose=(("sources", DbSourceSpec),)),
    "scrape": TableSpec(ScrapeSourceSpec, skip=frozenset({"name", "kind", "entity", "stream"})),
}


@dataclass(frozen=True)
class Row:
    key: str
    default: str
    meaning: str


def rows(spec: TableSpec) -> list[Row]:
    return list(_walk(spec.model, spec.prefix, spec, {}))


def _walk(model: type[BaseModel], prefix: str, spec: TableSpec, seen: dict[type[BaseModel], str]) -> Iterator[Row]:
    for name, field in model.model_fields.items():
        key = field.alias or name
        if not prefix and key in spec.skip:
            continue
        path = prefix + key
        nested, suffix = _nested(field.annotation, dict(spec.choose).get(key) if not prefix else None)
        suffix = suffix.replace("<>", f"<{_SINGULAR.get(key, key.removesuffix('s'))}>")  # entities.<entity>
        if nested is not None and nested not in _LEAVES:
            where = path + suffix.rstrip(".")
            if nested in seen:  # the same shape again (a field rule of a detail page): once is enough
                yield Row(f"`{where}`", _default(field), f"{field.description or ''} (keys as `{seen[nested]}`)")
                continue
            seen[nested] = where
            if field.description:
                yield Row(f"`{where}`", _default(field), field.description)
            yield from _walk(nested, path + suffix, spec, seen)
            continue
        yield Row(f"`{path}`", _default(field), field.description or "")


def _nested(annotation: Any, chosen: type[BaseModel] | None) -> tuple[type[BaseModel] | None, str]:
    """The model a field holds (directly, optionally, in a list or as dict values) and the path suffix."""
    annotation = _strip(annotation)
    origin = get_origin(annotation)
    if origin in (list, dict):
        inner, _ = _nested(get_args(annotation)[-1], chosen)
        return (inner, "[]." if origin is list else ".<>.") if inner is not None else (None, "")
    if origin in (Union, types.UnionType):
        models = [m for m in (_strip(a) for a in get_args(annotation)) if _is_model(m)]
        if chosen is not None and chosen in models:
            return chosen, "."
        return (models[0], ".") if len(models) == 1 else (None, "")
    return (annotation, ".") if _is_model(annotation) else (None, "")


def _strip(annotation: Any) -> Any:
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    return annotation


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _default(field: FieldInfo) -> str:
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    if DEFAULT_TEXT in extra:
        return str(extra[DEFAULT_TEXT])
    if field.is_required():
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default  # type: ignore[call-arg]
    if value is PydanticUndefined or value is None:
        return "none"
    if isinstance(value, BaseModel):
        return "see below"
    if _is_duration(field) and isinstance(value, (int, float)):
        return f"`{format_duration(float(value))}`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, (dict, list)) and not value:
        return "`{}`" if isinstance(value, dict) else "`[]`"
    return f"`{value}`"


def _is_duration(field: FieldInfo) -> bool:
    def marked(annotation: Any) -> bool:
        if get_origin(annotation) is Annotated:
            return any(isinstance(m, WithJsonSchema) and m.json_schema is _DURATION_SCHEMA
                       for m in get_args(annotation)[1:]) or marked(get_args(annotation)[0])
        return any(marked(a) for a in get_args(annotation)) if get_origin(annotation) in (
            Union, types.UnionType) else False

    return any(isinstance(m, WithJsonSchema) and m.json_schema is _DURATION_SCHEMA for m in field.metadata) or marked(
        field.annotation)


def format_duration(seconds: float) -> str:
    """The way the README writes a duration: `0`, `200ms`, `5s`, `5m`, `1h`."""
    if seconds == 0:
        return "0"
    for unit, size in (("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds * 1000:g}ms"


def table(spec: TableSpec) -> str:
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    lines += [f"| {r.key} | {r.default} | {_cell(r.meaning)} |" for r in rows(spec)]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def render(readme: str) -> str:
    """The README with every marked table regenerated; an unknown table name is an error."""

    def replace(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in TABLES:
            raise KeyError(f"README marker keys:{name} names no table; known: {', '.join(TABLES)}")
        return match.group(1) + table(TABLES[name]) + match.group(4)

    return _BLOCK.sub(replace, readme)


def undocumented() -> list[str]:
    """Keys whose model field has no description: the README would show an empty meaning."""
    return [f"{name}: {r.key}" for name, spec in TABLES.items() for r in rows(spec) if not r.meaning]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m straw.docs_gen", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md and the models disagree")
    parser.add_argument("--readme", type=Path, default=README)
    args = parser.parse_args(argv)
    text = args.readme.read_text(encoding="utf-8")
    missing = undocumented()
    for key in missing:
        print(f"no description: {key}; add Field(description=...) to the model", file=sys.stderr)
    generated = render(text)
    if args.check:
        if generated != text:
            print(f"{args.readme}: key tables differ from the models; run python -m straw.docs_gen", file=sys.stderr)
        return 1 if generated != text or missing else 0
    if generated != text:
        args.readme.write_text(generated, encoding="utf-8")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
