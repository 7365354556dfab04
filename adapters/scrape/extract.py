"""Selectors and field rules compiled once, applied to lxml trees.

A field rule yields one value per row: the text (whitespace collapsed, or line by
line) or an attribute of the first node it matches, checked against `null_if`,
cut by the optional regex, then parsed. `MISSING` means the selector matched
nothing (layout drift if the field is required); an empty cell or a `null_if`
placeholder is `None`. A required field that reads nothing usable raises
`Unusable` (layout drift); an optional one whose regex or parser fails gives an
`Unreadable`, which makes its item a dead letter naming the field, the text and
the configured format, never a null.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast
from zoneinfo import ZoneInfo

from lxml import etree
from lxml.cssselect import CSSSelector

from adapters.scrape.page import Node
from adapters.scrape.parse import Parser, parser, relative_reader
from straw.coerce import Unreadable
from straw.config_scrape import FieldRule, Locator, ParseType

Query = Callable[[Node], list[Any]]


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


class _Placeholder:
    def __repr__(self) -> str:
        return "PLACEHOLDER"


PLACEHOLDER: Any = _Placeholder()  # a `null_if` text: a value the page states as "none", never drift


def compile_query(css: str | None, xpath: str | None) -> Query:
    if css is not None:
        # A CSS selector always gives a list of elements: called as it is, no wrapper.
        return cast(Query, CSSSelector(css, translator="html"))
    compiled = etree.XPath(str(xpath))
    return lambda node: _as_list(compiled(node))


_ID_ONLY = re.compile(r"#(-?[A-Za-z_][A-Za-z0-9_-]*)")


def first_query(css: str | None, xpath: str | None) -> Query:
    """Like `compile_query`, for a caller that reads only the first match (a field rule).

    A bare `#id` selector is looked up in the document's ID table (libxml2 keeps one per parsed
    document; XPath `id()` gives its first element in document order) instead of the XPath that
    cssselect makes of it, which walks the whole tree: on a 70 KB detail page that walk was a tenth
    of the page's time. A hit outside the context node (a duplicate id elsewhere) falls back to the
    walk, so the answer is always the walk's first match.
    """
    walk = compile_query(css, xpath)
    plain = _ID_ONLY.fullmatch(css) if css is not None else None
    if plain is None:
        return walk
    ident = plain.group(1)
    lookup = etree.XPath(f"id('{ident}')")

    def query(node: Node) -> list[Any]:
        found: Any = lookup(node)
        if not found:
            return []
        hit = found[0]
        if hit.get("id") == ident and (hit is node or any(up is node for up in hit.iterancestors())):
            return [hit]
        return walk(node)[:1]

    return query


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


# Elements a browser shows on lines of their own: their text is kept apart in multi-line fields.
_BLOCKS = frozenset({
    "address", "article", "aside", "blockquote", "dd", "div", "dl", "dt", "fieldset", "figcaption", "figure",
    "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr", "li", "main", "nav", "ol", "p", "pre",
    "section", "table", "tbody", "thead", "tfoot", "tr", "ul",
})
_HIDDEN = frozenset({"script", "style", "template", "head", "title"})


_SOFT = "\x00"  # a block's edge: a line break unless one is there already


def _pieces(node: Node, out: list[str], structured: bool) -> None:
    tag = node.tag
    if not isinstance(tag, str) or tag in _HIDDEN:  # a comment, processing instruction, script...
        return
    block = tag in _BLOCKS
    out.append("\n" if tag == "br" else _SOFT if block else "")
    if node.text:
        out.append(_flat(node.text) if structured and tag not in ("pre", "textarea") else node.text)
    for child in node:
        _pieces(child, out, structured and tag not in ("pre", "textarea"))
        if child.tail:
            out.append(_flat(child.tail) if structured else child.tail)
    if block:
        out.append(_SOFT)


def _flat(text: str) -> str:
    return text.replace("\r", " ").replace("\n", " ")


_SOFT_BREAKS = re.compile(f"[ \t\r\n{_SOFT}]*{_SOFT}[ \t\r\n{_SOFT}]*")


def lines_of(node: Any) -> str:
    """The text with its line breaks, as a browser shows it: <br> and block elements break lines; in
    an element without them (a cell holding plain text, <pre>, <textarea>) the text's own newlines
    do (\\r\\n and \\r read as \\n). Each line whitespace-collapsed and trimmed; blank lines at the
    ends dropped, a run of them kept as one."""
    if isinstance(node, etree._Element):
        structured = any(True for _ in node.iterdescendants("br", *_BLOCKS))
        out: list[str] = []
        _pieces(node, out, structured)
        text = _SOFT_BREAKS.sub("\n", "".join(out))
    else:
        text = str(node)
    kept: list[str] = []
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        line = " ".join(line.split())
        if line or (kept and kept[-1]):
            kept.append(line)
    while kept and not kept[-1]:
        kept.pop()
    return "\n".join(kept)


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


class Unusable(Exception):
    """A required field read nothing usable on this row: layout drift. The text says what went wrong."""


def _placeholders(texts: Iterable[str]) -> frozenset[str]:
    return frozenset(" ".join(t.split()).casefold() for t in texts)


class Rule:
    def __init__(
        self, name: str, rule: FieldRule, null_if: Sequence[str] = (), zone: ZoneInfo | None = None
    ) -> None:
        self.name = name
        self.rule = rule
        self.selector = rule.describe()
        self.required = rule.required
        self._query = first_query(rule.css, rule.xpath) if rule.column is None else None
        self._column = str(rule.column).casefold()
        self._attr = rule.attr
        self._text = lines_of if rule.multiline else text_of
        self._regex = re.compile(rule.regex) if rule.regex else None
        self._nulls = _placeholders(rule.null_if if rule.null_if is not None else null_if)
        text = rule.parse is None or rule.parse.type is ParseType.TEXT
        self._parse: Parser | None = None if text else parser(rule.parse)
        spec = rule.parse
        self._relative = (
            relative_reader(spec, zone or ZoneInfo("UTC")) if spec is not None and spec.relative and not text else None
        )
        self._as_date = spec is not None and spec.type is ParseType.DATE

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

    def _placeholder(self, text: str) -> bool:
        return bool(self._nulls) and " ".join(text.split()).casefold() in self._nulls

    def _read(self, row: Row) -> Any:
        """MISSING, "" (an empty cell), PLACEHOLDER (a `null_if` text), an `Unreadable` (the regex
        did not match) or the text to parse."""
        # The hot path of a listing (every field of every row): one method, no helpers.
        node = self.node(row)
        if node is None:
            return MISSING
        if self._attr is not None and not isinstance(node, str):
            attr = node.get(self._attr)
            if attr is None:
                return MISSING
            text = " ".join(attr.split())
        else:
            text = self._text(node)
        if not text:
            return text
        if self._nulls and self._placeholder(text):
            return PLACEHOLDER
        if self._regex is not None:
            match = self._regex.search(text)
            if match is None:
                return Unreadable(text, f"{text!r} does not match regex /{self.rule.regex}/")
            cut = match.group(1) if self._regex.groups else match.group(0)
            if cut and self._placeholder(cut):
                return PLACEHOLDER
            return cut or ""
        return text

    def raw(self, row: Row) -> Any:
        """The text this rule picks in `row` before parsing: MISSING when nothing matched, None when
        empty or a placeholder, an `Unreadable` when the regex does not match."""
        text = self._read(row)
        return None if text == "" or text is PLACEHOLDER else text

    def value(self, row: Row, fetched: dt.datetime | None = None) -> Any:
        """The parsed value; MISSING when nothing matched, None for an empty cell or a placeholder.

        A required field raises `Unusable` for an empty cell, a regex without a match or a parse
        failure; an optional one gives an `Unreadable` (its item becomes a dead letter).
        `fetched`: when the page was fetched, what relative dates count back from.
        """
        text = self._read(row)
        if text.__class__ is str:
            if not text:
                if self.required:
                    raise Unusable("is empty")
                return None
            if self._parse is None:
                return text
            try:
                return self._parse(text)
            except ValueError as exc:
                found = self._relative_or(text, exc, fetched)
                if not isinstance(found, Unreadable):
                    return found
                problem, shown = found.reason, text
        elif isinstance(text, Unreadable):
            problem, shown = text.reason, text.text
        else:
            return None if text is PLACEHOLDER else text  # MISSING: the crawler decides
        if self.required:
            raise Unusable(problem)
        return Unreadable(shown, problem)

    def _relative_or(self, text: str, exc: ValueError, fetched: dt.datetime | None) -> Any:
        """The relative date `text` means, else an `Unreadable` with the parse failure's reason."""
        if self._relative is not None:
            try:
                moment = self._relative(text, fetched or dt.datetime.now(dt.UTC))
            except ValueError:
                pass
            else:
                return moment.date() if self._as_date else moment
        return Unreadable(text, str(exc))


def rules(fields: dict[str, FieldRule], null_if: Sequence[str] = (), zone: ZoneInfo | None = None) -> list[Rule]:
    return [Rule(name, rule, null_if, zone) for name, rule in fields.items()]
