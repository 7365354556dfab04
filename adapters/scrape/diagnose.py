"""What each selector finds on the page a run failed on: `straw preview`'s table after layout drift.

Read from the page the drift was found on (kept in the error), so nothing is fetched again
and nothing is written. Each field shows how many rows it matched, its first value, and why
it failed where it did: matched nothing, empty text, a regex without a match, a failed parse.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as default
from typing import Any

from lxml import etree

from adapters.scrape.errors import LayoutDrift
from adapters.scrape.extract import MISSING, Row, Rule, Tables, locator_query, rules, text_of
from adapters.scrape.hints import Hint, nearest, unmatched_scope
from adapters.scrape.page import Page
from straw.coerce import Unreadable
from straw.config_scrape import ScrapeSourceSpec

_FIELD = re.compile(r"field '(?P<name>[^']+)'")


@dataclass
class Probe:
    field: str
    selector: str
    required: bool
    matched: int  # rows (or pages) it found a usable value in
    of: int
    first: str | None  # the first value found, as text
    problem: str  # "" when every row gave a value
    hints: list[Hint] = default(default_factory=list)  # where it matched nothing: elements most like it


def on_detail_page(spec: ScrapeSourceSpec, drift: LayoutDrift, rows: list[etree._Element]) -> bool:
    """Whether the page drift was found on is a detail page (a detail field failed there)."""
    named = _FIELD.search(drift.what)
    return spec.detail is not None and (
        (named is not None and named["name"] in spec.detail.fields) or (not rows and drift.what != "list rows")
    )


def list_rows(spec: ScrapeSourceSpec, page: Page) -> list[etree._Element]:
    return [r for r in locator_query(spec.listing.rows)(page.tree) if isinstance(r, etree._Element)]


Previous = Mapping[str, Sequence[str]]  # field -> values it read before (published), as text


def probe(spec: ScrapeSourceSpec, drift: LayoutDrift, previous: Previous | None = None) -> list[Probe]:
    page = Page(drift.url, drift.html)
    before = previous or {}
    rows = list_rows(spec, page)
    if on_detail_page(spec, drift, rows):
        assert spec.detail is not None
        tables = Tables()
        return [_probe(rule, [Row(page.tree, tables)], before) for rule in rules(spec.detail.fields)]
    tables = Tables()
    found = [Row(node, tables) for node in rows]
    probes = [Probe("(rows)", str(spec.listing.rows), True, len(rows), len(rows), None,
                    "" if rows else "matched nothing")]
    return probes + [_probe(rule, found, before) for rule in rules(spec.listing.fields)]


def hints_for(rule: Rule, rows: Sequence[Row], read: Sequence[str], previous: Previous) -> list[Hint]:
    """Where `rule` matched nothing in some row: the elements there most like the values it read on
    the other rows, or published before, or whose classes resemble its selector's."""
    scope = unmatched_scope(rule, rows)
    if scope is None:
        return []
    return nearest(rule, scope, [*read, *previous.get(rule.name, ())])


def _probe(rule: Rule, rows: list[Row], previous: Previous) -> Probe:
    matched, first, problems = 0, None, []
    read: list[str] = []
    for number, row in enumerate(rows, 1):
        value, problem = _read(rule, row)
        if problem:
            problems.append((number, problem))
            continue
        matched += 1
        if value is not None:
            read.append(text_of(rule.node(row)))
        if first is None and value is not None:
            first = str(value)
    if not rows:
        text = "not tried: no rows"
    elif problems:
        number, why = problems[0]
        text = why if len(rows) == 1 else f"{why} (row {number}; {len(problems)} of {len(rows)} rows)"
    else:
        text = ""
    return Probe(rule.name, rule.selector, rule.required, matched, len(rows), first, text,
                 hints_for(rule, rows, read[:20], previous))


def _read(rule: Rule, row: Row) -> tuple[Any, str]:
    """The field's value in `row`, or why there is none."""
    try:
        node = rule.node(row)
        if node is None:
            return None, "matched nothing"
        raw = rule.raw(row)
        if raw is MISSING:
            return None, f"no attribute {rule.rule.attr!r}" if rule.rule.attr else "matched nothing"
        if raw is None:
            return None, f"regex /{rule.rule.regex}/ did not match {text_of(node)!r}"
        if raw == "":
            return None, "empty text"
        value = rule.value(row)
        if isinstance(raw, Unreadable):
            return None, raw.reason
        if isinstance(value, Unreadable):
            return None, value.reason
    except Exception as exc:  # what the extraction itself says is wrong (a parse error, say)
        return None, " ".join(str(exc).split()) or type(exc).__name__
    parse = rule.rule.parse
    if parse is not None and parse.type != "text" and isinstance(value, str):
        fmt = f" with format {parse.format!r}" if parse.format else ""
        return None, f"cannot read {raw!r} as {parse.type}{fmt} (locale {parse.locale!r})"
    return value, ""
