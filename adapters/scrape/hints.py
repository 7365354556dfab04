"""Hints for a field that matched nothing: the page's elements that look most like what it used to read.

Two resemblances count: the element's classes or id against the names in the field's selector
(`td.amt` → `td.amount`), and the element's text against values the field read before (on other
rows of the page, or published earlier), compared by shape: letters and digits only, so `0.00`
as published and `0,00 €` as shown are alike. Each hint is a selector that finds the element
first where the field looks (checked, never guessed), with the element's text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from difflib import SequenceMatcher

from adapters.scrape.extract import Row, Rule, Tables, compile_query, text_of
from adapters.scrape.page import Node

THRESHOLD = 0.6  # below this, a resemblance is noise (SequenceMatcher ratio)
_NAME = re.compile(r"[.#]([A-Za-z_][\w-]*)|['\"]([A-Za-z_][\w-]*)['\"]")
_LONG = 200  # elements with more text are containers, not values


@dataclass(frozen=True)
class Hint:
    selector: str  # CSS, relative to the row (list fields) or the page (detail fields)
    text: str
    why: str
    score: float


def _names(rule: Rule) -> list[str]:
    """The class, id or attribute names a selector is written with (`td.amt` → `amt`)."""
    source = rule.rule.css or rule.rule.xpath or ""
    return [a or b for a, b in _NAME.findall(source)]


def _shape(text: str) -> str:
    return "".join(ch for ch in text.casefold() if ch.isalnum())


def _similar(a: str, b: str) -> float:
    return SequenceMatcher(None, a, b).ratio() if a and b else 0.0


def _step(node: Node) -> str:
    """One element of a CSS path: `#id`, `tag.class`, else `tag:nth-child(k)`."""
    ident = node.get("id")
    if ident and re.fullmatch(r"[A-Za-z_][\w-]*", ident):
        return f"#{ident}"
    classes = [c for c in (node.get("class") or "").split() if re.fullmatch(r"[A-Za-z_][\w-]*", c)]
    if classes:
        return str(node.tag) + "".join(f".{c}" for c in classes)
    parent = node.getparent()
    place = [c for c in parent if isinstance(c.tag, str)].index(node) + 1 if parent is not None else 1
    return f"{node.tag}:nth-child({place})"


def _selector(node: Node, scope: Node) -> str | None:
    """A CSS path from `scope` to `node` that finds `node` first (else None)."""
    steps: list[str] = []
    at: Node | None = node
    while at is not None and at is not scope:
        steps.append(_step(at))
        if steps[-1].startswith("#"):
            break
        at = at.getparent()
    css = " > ".join(reversed(steps))
    try:
        found = compile_query(css, None)(scope)
    except Exception:  # a selector cssselect cannot express: no hint rather than a wrong one
        return None
    return css if found and found[0] is node else None


def _elements(scope: Node) -> Iterable[Node]:
    for node in scope.iterdescendants():
        if isinstance(node.tag, str) and node.tag not in ("script", "style", "head", "title", "meta", "link"):
            yield node


def nearest(rule: Rule, scope: Node, previous: Sequence[str] = (), limit: int = 3) -> list[Hint]:
    """The elements under `scope` (a row, or a detail page) most like what `rule` should find."""
    names = [n.casefold() for n in _names(rule)]
    shapes = list(dict.fromkeys(s for s in (_shape(p) for p in previous) if s))[:50]
    header = Row(scope, Tables()).header() if rule.rule.column is not None else None
    best: dict[str, Hint] = {}
    for node in _elements(scope):
        text = text_of(node)
        if not text or len(text) > _LONG:
            continue
        reasons: list[tuple[float, str]] = []
        for name in names:
            for own in [*(node.get("class") or "").split(), node.get("id") or ""]:
                score = _similar(name, own.casefold())
                if score >= THRESHOLD:
                    reasons.append((score, f"class or id {own!r} is like {name!r}"))
        shape = _shape(text)
        for wanted, shown in zip(shapes, previous, strict=False):
            score = _similar(wanted, shape)
            if score >= THRESHOLD:
                reasons.append((score, f"text is like {shown!r}, read before"))
        if not reasons:
            continue
        score, why = max(reasons)
        css = _selector(node, scope)
        if css is None:
            continue
        if css not in best or best[css].score < score:
            best[css] = Hint(css, text, why, score)
    hints = sorted(best.values(), key=lambda h: -h.score)
    if header is not None:
        # A column read by its header: the headers most like the configured one are hints too.
        wanted = str(rule.rule.column).casefold()
        for shown in header.shown:
            score = _similar(wanted, shown.casefold())
            if score >= THRESHOLD and shown.casefold() != wanted:
                hints.append(Hint(f"column {shown!r}", shown, f"header is like {rule.rule.column!r}", score))
        hints.sort(key=lambda h: -h.score)
    return hints[:limit]


def unmatched_scope(rule: Rule, rows: Sequence[Row]) -> Node | None:
    """The first row where `rule` finds nothing: where its hints are looked for."""
    for row in rows:
        if rule.node(row) is None:
            return row.node
    return None


def describe(hints: Sequence[Hint]) -> str:
    return "; ".join(f"{h.selector} {h.text[:40]!r} ({h.why})" for h in hints)

