"""`straw preview --screenshot`: a page with every field's matched elements outlined and labelled.

The elements are found by the same rules the crawl uses (lxml, on the page the preview read:
the first list page, or the page layout drift was found on), marked in a copy of its tree,
and that copy is shown in Chromium with JavaScript off: the page's scripts already ran (browser
mode) or are not what static mode reads, and must not rebuild what was marked. Boxes and labels
are drawn on a layer outside the page's flow, so the page's own layout is what the picture shows.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lxml import etree

from adapters.scrape.errors import ScrapeError
from adapters.scrape.extract import Row, Tables, locator_query, rules
from adapters.scrape.fetch_browser import LAUNCH_ARGS, driver_acquire, driver_release
from adapters.scrape.page import Node, Page
from straw.config_scrape import FieldRule, ScrapeSourceSpec

# Distinct on screen and from each other (Kelly/Trubetskoy colours); a field keeps its colour by its
# place in the configuration.
COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#0f9dba", "#f032e6", "#9a6324",
           "#808000", "#000075"]
BANNER = "#b00020"
BORDER_PX = 3
_MARK = "data-straw-field"

# Runs in the page (JavaScript off for the page's own scripts; Playwright's evaluate still runs).
_OVERLAY = """({colours, banner, bannerColour, border}) => {
  const layer = document.createElement('div');
  layer.setAttribute('style', 'position:absolute;left:0;top:0;width:0;height:0;overflow:visible;'
    + 'z-index:2147483647;pointer-events:none');
  const labelled = new Set();
  const box = (css) => { const d = document.createElement('div'); d.setAttribute('style', css); return d; };
  for (const el of document.querySelectorAll('[data-straw-field]')) {
    const r = el.getBoundingClientRect();
    if (r.width === 0 && r.height === 0) continue;
    const left = r.left + window.scrollX, top = r.top + window.scrollY;
    el.getAttribute('data-straw-field').split(' ').forEach((name, i) => {
      const colour = colours[name];
      layer.appendChild(box(`position:absolute;box-sizing:border-box;left:${left - i * border}px;`
        + `top:${top - i * border}px;width:${r.width + 2 * i * border}px;height:${r.height + 2 * i * border}px;`
        + `border:${border}px solid ${colour}`));
      if (labelled.has(name)) return;  // each field named once, at its first match: rows stay readable
      labelled.add(name);
      const above = top - i * border - 12 >= 0 ? top - i * border - 12 : top - i * border;
      const label = box(`position:absolute;left:${left - i * border}px;top:${above}px;`
        + `background:${colour};color:#fff;font:bold 10px/12px monospace;padding:0 3px;white-space:nowrap`);
      label.textContent = name;
      layer.appendChild(label);
    });
  }
  if (banner.length) {
    const bar = box(`position:absolute;left:0;top:0;width:${document.documentElement.scrollWidth}px;`
      + `box-sizing:border-box;background:${bannerColour};color:#fff;font:bold 13px/18px sans-serif;padding:6px 10px`);
    banner.forEach((line) => { const p = document.createElement('div'); p.textContent = line; bar.appendChild(p); });
    layer.appendChild(bar);
  }
  document.documentElement.appendChild(layer);
}"""


@dataclass
class Marked:
    """A page's tree with the matched elements marked, and what was (not) found."""

    tree: Node
    found: dict[str, int] = field(default_factory=dict)  # field -> elements marked
    missing: list[tuple[str, str, bool]] = field(default_factory=list)  # (field, selector, required)

    def banner(self) -> list[str]:
        required = [f"{name} ({where})" for name, where, need in self.missing if need]
        optional = [f"{name} ({where})" for name, where, need in self.missing if not need]
        lines = []
        if required:
            lines.append("required fields that matched nothing: " + ", ".join(required))
        if optional:
            lines.append("optional fields that matched nothing: " + ", ".join(optional))
        return lines


def colours(spec: ScrapeSourceSpec) -> dict[str, str]:
    names = [*spec.listing.fields, *(spec.detail.fields if spec.detail else {})]
    return {name: COLOURS[i % len(COLOURS)] for i, name in enumerate(names)}


def _element(found: Any) -> Node | None:
    """The element a rule's match sits in: an XPath text or attribute result stands for its element."""
    if isinstance(found, etree._Element):
        return found
    parent = getattr(found, "getparent", None)
    owner = parent() if parent is not None else None
    return owner if isinstance(owner, etree._Element) else None


def mark(spec: ScrapeSourceSpec, page: Page, on_detail: bool) -> Marked:
    tree = copy.deepcopy(page.tree)
    fields: dict[str, FieldRule]
    if on_detail:
        assert spec.detail is not None
        fields, rows = spec.detail.fields, [tree]
    else:
        fields = spec.listing.fields
        rows = [r for r in locator_query(spec.listing.rows)(tree) if isinstance(r, etree._Element)]
    marked = Marked(tree)
    tables = Tables()
    read = [Row(node, tables) for node in rows]
    for rule in rules(fields):
        count = 0
        for row in read:
            element = _element(rule.node(row))
            if element is None:
                continue
            names = (element.get(_MARK) or "").split()
            if rule.name not in names:
                element.set(_MARK, " ".join([*names, rule.name]))
                count += 1
        if count:
            marked.found[rule.name] = count
        else:
            marked.missing.append((rule.name, rule.selector, rule.required))
    return marked


def _with_base(tree: Node, url: str) -> str:
    """The page as HTML whose relative links (its stylesheets) still point at the server it came from."""
    head = tree.find("head")
    if head is None:
        head = etree.Element("head")
        tree.insert(0, head)
    if head.find("base") is None:
        head.insert(0, etree.Element("base", href=url))
    return etree.tostring(tree, method="html", encoding="unicode")


def render(spec: ScrapeSourceSpec, page: Page, marked: Marked, out: Path) -> None:
    """Write the PNG (owner-only: a logged-in page) of `marked` as Chromium lays it out."""
    try:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise ScrapeError("--screenshot needs Playwright: pip install 'straw[browser]'") from None
    if not spec.browser_executable.exists():
        raise ScrapeError(f"--screenshot needs a browser: none at {spec.browser_executable}; install Chromium "
                          "(Debian: apt-get install chromium) or set `browser_executable`")
    try:  # before starting a browser: a path that cannot be written fails at once
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ScrapeError(f"--screenshot: cannot write {out}: {exc.strerror or exc}") from None
    playwright = driver_acquire(sync_playwright)
    try:
        browser = playwright.chromium.launch(executable_path=str(spec.browser_executable), args=LAUNCH_ARGS,
                                             headless=True)
        try:
            context = browser.new_context(java_script_enabled=False, ignore_https_errors=spec.http.verify is False)
            context.set_default_timeout(spec.http.timeout * 1000)
            shown = context.new_page()
            shown.set_content(_with_base(marked.tree, page.url), wait_until="load")
            shown.evaluate(_OVERLAY, {"colours": colours(spec), "banner": marked.banner(), "bannerColour": BANNER,
                                     "border": BORDER_PX})
            shown.screenshot(path=str(out), full_page=True)
        except PlaywrightError as exc:
            raise ScrapeError(f"--screenshot: could not render {page.url}: {exc.message.splitlines()[0]}") from None
        finally:
            browser.close()
    finally:
        driver_release()
    os.chmod(out, 0o600)


def take(spec: ScrapeSourceSpec, page: Page, on_detail: bool, out: Path) -> Marked:
    marked = mark(spec, page, on_detail)
    render(spec, page, marked, out)
    return marked
