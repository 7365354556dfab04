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
from typing import Any, cast

from lxml import etree
from lxml.cssselect import CSSSelector

from adapters.scrape.page import Node
from adapters.scrape.parse import Parser, parser
from straw.config_scrape import FieldRule, Locator, ParseType

Query = Callable[[Node], list[Any]]


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


def compile_query(css: str | None, xpath: str | None) -> Query:
    if css is not None:
        # A CSS selector always gives a list of elements: called as it is, no wrapper.
        return cast(Query, CSSSelector(css, translator="html"))
    compiled = etree.XPath(str(xpath))
    return lambda node: _as_list(compiled(node))


def _as_list(result: object) -> list[Any]:
    # An XPath may give a string, number or boolean (`string(./td[2])`): one value.
    return result if isinstance(result, list) else [result]


def locator_query(locator: Locator) -> Query:
    return compile_query(locator.css, locator.xpath)


def text_of(node: Any) -> str:
    """The DOM's textContent, whitespace collapsed."""
    if not isinstance(node, etree._Element):
        return " ".join(str(node).split())  # an XPath's string (or number) result
    if len(node) == 0:  # a leaf cell, most of them: its own text is all there is
        text = node.text
        return " ".join(text.split()) if text else ""
    # The text serializer gives what itertext() joins, several times faster.
    return " ".join(etree.tostring(node, method="text", encoding="unicode", with_tail=False).split())


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


class Tables:
    """The header maps of one page's tables, keyed by the rows' parent: worked out once per page."""

    def __init__(self) -> None:
        # Keyed by the element itself: holding it keeps lxml handing out this same proxy object.
        self._by_parent: dict[Node | None, HeaderMap | None] = {}

    def of(self, row: Node) -> HeaderMap | None:
        parent = row.getparent()
        try:
            return self._by_parent[parent]
        except KeyError:
            table = row if row.tag == "table" else next(row.iterancestors("table"), None)
            found = self._by_parent[parent] = header_map(table) if table is not None else None
            return found


class Row:
    """One list row (or a detail page's root) as the rules read it: its cells are listed once for all
    column rules, not once per rule."""

    __slots__ = ("_cells", "_header", "_header_known", "node", "tables")

    def __init__(self, node: Node, tables: Tables) -> None:
        self.node = node
        self.tables = tables
        self._cells: list[Node] | None = None
        self._header: HeaderMap | None = None
        self._header_known = False

    def cells(self) -> list[Node]:
        if self._cells is None:
            self._cells = [c for c in self.node if c.tag == "td" or c.tag == "th"]
        return self._cells

    def header(self) -> HeaderMap | None:
        """The header map of the row's table; None outside a table."""
        if not self._header_known:
            self._header, self._header_known = self.tables.of(self.node), True
        return self._header


class Rule:
    def __init__(self, name: str, rule: FieldRule) -> None:
        self.name = name
        self.rule = rule
        self.selector = rule.describe()
        self.required = rule.required
        self._query = compile_query(rule.css, rule.xpath) if rule.column is None else None
        self._column = str(rule.column).casefold()
        self._attr = rule.attr
        self._regex = re.compile(rule.regex) if rule.regex else None
        text = rule.parse is None or rule.parse.type is ParseType.TEXT
        self._parse: Parser | None = None if text else parser(rule.parse)

    def node(self, row: Row) -> Any:
        """The first node this rule matches in `row`, or None."""
        if self._query is not None:
            found = self._query(row.node)
            return found[0] if found else None
        header = row.header()
        if header is None:
            return None
        index = header.columns.get(self._column)
        if index is None:
            return None
        cells = row.cells()
        return cells[index] if index < len(cells) else None

    def raw(self, row: Row) -> Any:
        """The text this rule picks in `row` before parsing; MISSING when nothing matched."""
        node = self.node(row)
        if node is None:
            return MISSING
        if self._attr is not None and not isinstance(node, str):
            attr = node.get(self._attr)
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

    def value(self, row: Row) -> Any:
        text = self.raw(row)
        if text is MISSING or text is None or text == "":
            return None if text == "" else text
        if self._parse is None:
            return text
        try:
            return self._parse(text)
        except ValueError:
            # Keep the shown text: the mapper cannot coerce it either and sends the row to the
            # dead letters with the text and the reason, instead of failing the whole run.
            return text


def rules(fields: dict[str, FieldRule]) -> list[Rule]:
    return [Rule(name, rule) for name, rule in fields.items()]
