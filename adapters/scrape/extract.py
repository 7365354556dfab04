"""Selectors and field rules compiled once, applied to lxml trees.

A field rule yields one value per row: the text (whitespace collapsed) or an
attribute of the first node it matches, cut by the optional regex, then parsed.
`MISSING` means the selector matched nothing (layout drift if the field is
required); an empty cell is `None`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lxml import etree
from lxml.cssselect import CSSSelector

from adapters.scrape.page import Node
from adapters.scrape.parse import Parser, parser
from straw.config_scrape import FieldRule, Locator

Query = Callable[[Node], list[Any]]


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


def compile_query(css: str | None, xpath: str | None) -> Query:
    if css is not None:
        selector = CSSSelector(css, translator="html")
        return lambda node: _as_list(selector(node))
    compiled = etree.XPath(str(xpath))
    return lambda node: _as_list(compiled(node))


def _as_list(result: object) -> list[Any]:
    return [*result] if isinstance(result, list) else [result]


def locator_query(locator: Locator) -> Query:
    return compile_query(locator.css, locator.xpath)


def text_of(node: Any) -> str:
    if isinstance(node, str):
        return " ".join(node.split())
    return " ".join("".join(node.itertext()).split())  # as the DOM's textContent, whitespace collapsed


def playwright_selector(locator: Locator) -> str:
    return f"css={locator.css}" if locator.css is not None else f"xpath={locator.xpath}"


@dataclass
class HeaderMap:
    """A table's header texts (casefolded) -> cell index; one per table per page."""

    columns: dict[str, int]
    shown: list[str]


def _header_row(table: Node) -> Node | None:
    """The first row of <thead>, else the first row holding <th> cells (in <tbody> or not)."""
    for child in table:
        if child.tag == "thead":
            return next((row for row in child if row.tag == "tr"), None)
        rows = [child] if child.tag == "tr" else [r for r in child if r.tag == "tr"] if child.tag == "tbody" else []
        for row in rows:
            if any(cell.tag == "th" for cell in row):
                return row
    return None


def header_map(table: Node) -> HeaderMap:
    # Plain iteration: lxml's first XPath on a fresh document costs more than walking a few rows.
    head = _header_row(table)
    cells = [c for c in head if c.tag == "th" or c.tag == "td"] if head is not None else []
    shown = [text_of(c) for c in cells]
    return HeaderMap({s.casefold(): i for i, s in enumerate(shown)}, shown)


class Rule:
    def __init__(self, name: str, rule: FieldRule) -> None:
        self.name = name
        self.rule = rule
        self.selector = rule.describe()
        self.required = rule.required
        self._query = compile_query(rule.css, rule.xpath) if rule.column is None else None
        self._regex = re.compile(rule.regex) if rule.regex else None
        self._parse: Parser = parser(rule.parse)

    def nodes(self, row: Node, headers: dict[Node, HeaderMap]) -> list[Any]:
        if self._query is not None:
            return self._query(row)
        table = next(row.iterancestors("table"), None)
        if table is None:
            return []
        # Keyed by the element itself: holding it keeps lxml handing out this same proxy object.
        found = headers.get(table)
        if found is None:
            found = headers[table] = header_map(table)
        index = found.columns.get(str(self.rule.column).casefold())
        if index is None:
            return []
        cells = [c for c in row if c.tag == "td" or c.tag == "th"]  # an XPath costs more than 5 children
        return [cells[index]] if index < len(cells) else []

    def raw(self, row: Node, headers: dict[Node, HeaderMap]) -> Any:
        """The text this rule picks in `row` before parsing; MISSING when nothing matched."""
        nodes = self.nodes(row, headers)
        if not nodes:
            return MISSING
        node = nodes[0]
        if self.rule.attr is not None and not isinstance(node, str):
            attr = node.get(self.rule.attr)
            if attr is None:
                return MISSING
            text = " ".join(attr.split())
        else:
            text = text_of(node)
        if self._regex is not None:
            match = self._regex.search(text)
            if match is None:
                return None
            text = match.group(1) if self._regex.groups else match.group(0)
        return text

    def value(self, row: Node, headers: dict[Node, HeaderMap]) -> Any:
        text = self.raw(row, headers)
        if text is MISSING or text is None or text == "":
            return None if text == "" else text
        try:
            return self._parse(text)
        except ValueError:
            # Keep the shown text: the mapper cannot coerce it either and sends the row to the
            # dead letters with the text and the reason, instead of failing the whole run.
            return text


def rules(fields: dict[str, FieldRule]) -> list[Rule]:
    return [Rule(name, rule) for name, rule in fields.items()]
