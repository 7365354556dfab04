"""One fetched page: its final URL, its text, its parsed tree and when it was fetched; plus charset decoding."""

from __future__ import annotations

import codecs
import datetime as dt
import logging
import re
from collections.abc import Callable
from functools import cache
from typing import Any

import structlog
from bs4.dammit import EncodingDetector, UnicodeDammit
from lxml import etree
from lxml.cssselect import CSSSelector

Node = etree._Element

# As browsers do (WHATWG Encoding): a page that says latin-1 or ASCII is read as windows-1252,
# which is what old servers really send; € and curly quotes live in 0x80-0x9F.
_AS_WINDOWS_1252 = {"iso8859-1", "latin-1", "ascii", "cp1252"}
_USUAL = ["utf-8", "windows-1252"]  # tried, in this order, after what the page declares


# beautifulsoup4 logs a warning without saying which page; decode() logs its own, with the URL.
logging.getLogger("bs4.dammit").setLevel(logging.ERROR)


def log() -> Any:
    # Not cached at import: logs.setup() may be re-run (the CLI, tests) and point at another stream.
    return structlog.get_logger("straw.scrape")


def _canonical(name: str | None) -> str | None:
    if not name:
        return None
    try:
        found = codecs.lookup(name.strip().strip("\"'")).name
    except LookupError:
        return None
    return "cp1252" if found in _AS_WINDOWS_1252 else found


def _header_charset(content_type: str | None) -> str | None:
    if content_type and "charset=" in content_type.lower():
        return content_type.lower().split("charset=", 1)[1].split(";")[0]
    return None


def decode(body: bytes, content_type: str | None, forced: str | None = None, url: str | None = None) -> str:
    """Decode a page body with beautifulsoup4's detection: the forced charset, a byte order mark, the
    header's charset, the page's <meta> or XML declaration, each tried strictly in that order, then
    UTF-8 and windows-1252, then detection (if charset-normalizer or chardet is installed). A page
    declaring UTF-8 but holding windows-1252 bytes thus reads as windows-1252 instead of turning
    into U+FFFD. A page read by a guess, or with replacement characters because no encoding reads
    it whole, is a warning naming the URL: the values of that page may be wrong.
    """
    data, bom = EncodingDetector.strip_byte_order_mark(body)
    tried = [_canonical(name) for name in (forced, bom, _header_charset(content_type))]
    if not any(tried):
        # Read here only when nothing else is declared (UnicodeDammit finds it itself after a header
        # that fails): a page declaring latin-1 is read as windows-1252, as browsers do.
        tried.append(_canonical(EncodingDetector.find_declared_encoding(data, is_html=True)))
    known = [name for name in dict.fromkeys(tried) if name]
    # UTF-8 and windows-1252 before any statistical guess: a guess (charset-normalizer or chardet,
    # when installed) reads a short Western page as windows-1250 as readily as not.
    dammit = UnicodeDammit(data, known_definite_encodings=known, user_encodings=_USUAL, is_html=True)
    text = dammit.unicode_markup
    if text is None:  # UnicodeDammit gives up only on an empty body
        return ""
    if dammit.contains_replacement_characters:
        # UnicodeDammit's last resort is UTF-8: for a windows-1252 page with one undefined byte that
        # would replace every accent. Keep whichever reading replaces fewer characters.
        western = data.decode("cp1252", errors="replace")
        if western.count("\ufffd") < text.count("\ufffd"):
            text = western
        log().warning("page is not valid in any encoding tried; unreadable bytes became U+FFFD",
                      url=url, tried=", ".join(known) or "none declared")
    elif dammit.original_encoding not in (*known, *_USUAL):
        log().warning("page is in no encoding declared, nor UTF-8 or windows-1252; its encoding was guessed, "
                      "set `http.encoding` if its text looks wrong", url=url, read_as=dammit.original_encoding)
    elif known and dammit.original_encoding not in known:
        log().info("page is not in the encoding it declares", url=url, declared=known[0],
                   read_as=dammit.original_encoding)
    return text


def rendered(url: str, html: str) -> str:
    """A browser's serialized DOM, checked: the browser decoded the page itself, trusting its declared
    charset, so bytes it could not read are U+FFFD already; the values of such a page may be wrong."""
    if "\ufffd" in html:
        log().warning("page holds U+FFFD replacement characters: the browser could not decode it whole; "
                      "check its charset", url=url)
    return html


class Page:
    """`html` may be given as a function: the browser's DOM is serialized only when first read."""

    def __init__(self, url: str, html: str | Callable[[], str]) -> None:
        self.url = url
        self._html = html
        self.fetched = dt.datetime.now(dt.UTC)  # what relative dates ('5 minutes ago') count back from
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
