"""The status page for people: one server-rendered HTML document, refreshed by the browser every 5 s.

Everything legacy or operator-written (source names, errors, positions) is
escaped; the page loads nothing from anywhere (inline CSS, an inline SVG chart,
no script), so it works on a host with no internet and passes a strict CSP.
"""

from __future__ import annotations

from html import escape
from typing import Any

REFRESH_SECONDS = 5

_STYLE = """
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em;margin:0 0 .2em}h1 small{color:#777;font-weight:normal}
table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{padding:.3em .7em;border-bottom:1px solid #ddd;text-align:left}
th{background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}
.error{color:#b00020}.ok{color:#1b7f3b}.new{color:#777}.err{color:#b00020;max-width:40em}
svg rect{fill:#3b6ea8}
"""


def _cell(value: Any, cls: str = "") -> str:
    text = "" if value is None else str(value)
    return f'<td class="{cls}">{escape(text)}</td>' if cls else f"<td>{escape(text)}</td>"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def chart(per_minute: list[int], width: int = 240, height: int = 40) -> str:
    """Bars of records published per minute over the last hour, oldest left, as inline SVG."""
    top = max(per_minute, default=0) or 1
    bar = width / max(len(per_minute), 1)
    rects = "".join(
        f'<rect x="{i * bar:.1f}" y="{height - count / top * height:.1f}" width="{max(bar - 1, 1):.1f}" '
        f'height="{count / top * height:.1f}"><title>{count} records</title></rect>'
        for i, count in enumerate(per_minute) if count
    )
    total = sum(per_minute)
    return (f'<svg class="chart" role="img" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
            f'aria-label="{total} records published in the last hour">'
            f'<rect x="0" y="{height - 1}" width="{width}" height="1" style="fill:#bbb"/>{rects}</svg>')


def _filters(counts: dict[str, int], shown: int) -> str:
    """Links that list one state, or all: with hundreds of sources, errors first is not always enough."""
    links = [f'<a href="?state={state}">{count} {state}</a>' for state, count in counts.items()]
    sorts = '<a href="?sort=name">by name</a> · <a href="?sort=last-poll">by last poll</a>'
    return f'showing {shown}: <a href="?">all</a> · {" · ".join(links)} · sorted errors first, or {sorts}'


def render_page(document: dict[str, Any]) -> str:
    counts = document["counts"]
    rows = []
    for s in document["sources"]:
        rows.append(
            f'<tr data-source="{escape(s["source"])}">' + _cell(s["source"]) + _cell(s["state"], s["state"])
            + _cell(s["last_poll"]) + _cell(s["read"], "n") + _cell(s["published"], "n")
            + _cell(s["dead_letters"], "n") + _cell(s.get("lease") or "—") + _cell(s["error"], "err") + "</tr>"
        )
    streams = []
    for t in document["streams"]:
        hour = t.get("published_last_hour", [])
        streams.append(
            f'<tr data-stream="{escape(t["stream"])}">' + _cell(t["stream"]) + _cell(t["backlog"], "n")
            + _cell("?" if t["length"] is None else t["length"], "n") + _cell(_age(t["oldest_unpublished_age"]))
            + _cell(t["last_publish"]) + f"<td>{chart(hour)} <span class=n>{sum(hour)}</span></td>"
            + _cell(t["error"], "err") + "</tr>"
        )
    instance = escape(str(document.get("instance", "")))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="{REFRESH_SECONDS}">
<title>straw {instance}</title><style>{_STYLE}</style></head><body>
<h1>straw <small>{instance}</small></h1>
<p id="summary">{sum(counts.values())} sources: {counts["error"]} error, {counts["new"]} new, {counts["ok"]} ok;
outbox backlog {document["outbox"]["backlog"]} records</p>
<p id="filters">{_filters(counts, len(document["sources"]))}</p>
<h2>Sources</h2>
<table id="sources"><thead><tr><th>source</th><th>state</th><th>last poll (UTC)</th><th>rows read</th>
<th>changes published</th><th>dead letters</th><th>lease holder</th><th>last error</th></tr></thead>
<tbody>{"".join(rows)}</tbody></table>
<h2>Streams</h2>
<table id="streams"><thead><tr><th>stream</th><th>backlog</th><th>length</th><th>oldest waiting</th>
<th>last publish (UTC)</th><th>published, last hour (per minute)</th><th>relay error</th></tr></thead>
<tbody>{"".join(streams)}</tbody></table>
<p><a href="status.json">status.json</a> · <a href="metrics">metrics</a> · <a href="readyz">readyz</a></p>
</body></html>
"""
