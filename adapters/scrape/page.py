"""One fetched page: its final URL, its text, and its parsed tree; plus legacy charset decoding."""

from __future__ import annotations

import codecs
import re
from collections.abc import Callable
from functools import cache
from typing import Any

from lxml import etree
from lxml.cssselect import CSSSelector

Node = etree._Element

_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_:.-]+)""", re.IGNORECASE)
# As browsers do (WHATWG Encoding): a page that says latin-1 or ASCII is read as windows-1252,
# which is what old servers really send; € and curly quotes live in 0x80-0x9F.
_AS_WINDOWS_1252 = {"iso8859-1", "latin-1", "ascii", "cp1252"}


def _canonical(name: str) -> str | None:
    try:
        found = codecs.lookup(name.strip().strip("\"'")).name
    except LookupError:
        return None
    return "cp1252" if found in _AS_WINDOWS_1252 else found


def decode(body: bytes, content_type: str | None, forced: str | None = None) -> str:
    """Decode a page body: forced charset, else the header's, else a <meta>, else UTF-8 or windows-1252."""
    candidates: list[str | None] = [forced]
    if content_type and "charset=" in content_type.lower():
        candidates.append(content_type.lower().split("charset=", 1)[1].split(";")[0])
    meta = _META_CHARSET.search(body[:4096])
    if meta:
        candidates.append(meta.group(1).decode("ascii", "replace"))
    for name in candidates:
        encoding = _canonical(name) if name else None
        if encoding:
            return body.decode(encoding, errors="replace")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        # Undeclared and not UTF-8: an old Western page, almost always windows-1252.
        return body.decode("cp1252", errors="replace")


class Page:
    """`html` may be given as a function: the browser's DOM is serialized only when first read."""

    def __init__(self, url: str, html: str | Callable[[], str]) -> None:
        self.url = url
        self._html = html
        self._tree: Node | None = None

    @property
    def html(self) -> str:
        if not isinstance(self._html, str):
            self._html = self._html()
        return self._html

    @property
    def tree(self) -> Node:
        if self._tree is None:
            # A leading XML declaration makes lxml refuse a str; the text is decoded already.
            text = re.sub(r"^\s*<\?xml[^>]*>", "", self.html)
            # Plain etree elements, not lxml.html's: its per-element class lookup in Python doubles the cost.
            root = etree.HTML(text) if text.strip() else None
            self._tree = root if root is not None else etree.HTML("<html></html>")
        return self._tree


@cache
def _xpath(expression: str) -> etree.XPath:
    return etree.XPath(expression)


@cache
def _css(selector: str) -> CSSSelector:
    return CSSSelector(selector, translator="html")


def elements(node: Node, xpath: str) -> list[Node]:
    """The elements an XPath finds (compiled once; lxml's stubs type results as any XPath result)."""
    found: Any = _xpath(xpath)(node)
    return [n for n in found if isinstance(n, etree._Element)]


def strings(node: Node, xpath: str) -> list[str]:
    found: Any = _xpath(xpath)(node)
    return [str(n) for n in found]


def css(node: Node, selector: str) -> list[Node]:
    found: Any = _css(selector)(node)
    return list(found)
