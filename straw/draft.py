"""The draft configuration `straw discover` writes: YAML with a comment on every choice.

Written line by line rather than dumped, because the comments are the point: each
entity field says its SQL type, each source why its mode was chosen. Every value
goes through `_scalar`, which quotes whatever YAML would otherwise read differently.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Sequence

import yaml

from adapters.db.catalog import TableInfo
from adapters.db.field_types import DraftField, field_for
from adapters.db.propose import Proposal
from straw.config import FieldType
from straw.discover import PASSWORD_VAR, Discovery, Found

REDIS_URL = "${REDIS_URL:-redis://127.0.0.1:6379/0}"
SWEEP_INTERVAL = "1h"
_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")


def _scalar(value: str) -> str:
    if _PLAIN.fullmatch(value) is not None and yaml.safe_load(value) == value:  # not `yes`, `null`, `1e3`
        return value
    # Double-quoted, on one line, with YAML's own escapes for what it refuses raw (NEL, BOM, non-printables).
    return yaml.safe_dump(value, default_style='"', allow_unicode=True, width=2**31).rstrip("\n")


def _said(text: str) -> str:
    """Text for a comment: a line break in a legacy name must not end the comment and start YAML."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def name_for(table: str) -> str:
    """A source, entity and stream name from a table name: lower case, other characters as '-'."""
    return re.sub(r"[^a-z0-9_.-]+", "-", table.lower()).strip("-._") or "table"


def field_names(table: TableInfo) -> dict[str, str]:
    """column -> entity field: snake_case of the column name, numbered where two would collide."""
    out: dict[str, str] = {}
    for column in table.columns:
        base = re.sub(r"\W+", "_", column.name.lower()).strip("_") or "column"
        name, n = base, 2
        while name in out.values():
            name, n = f"{base}_{n}", n + 1
        out[column.name] = name
    return out


def snapshot_interval(rows: int | None) -> str:
    """A listing reads the whole table: give bigger tables more time between listings."""
    if rows is None or rows < 10_000:
        return "1m"
    return "10m" if rows < 1_000_000 else "1h"


def render(discovery: Discovery, stream_prefix: str) -> str:
    chosen = [f for f in discovery.found if f.proposal is not None]
    names = _unique_names([f.table.name for f in chosen])
    lines = [
        f"# Drafted by `straw discover` at {discovery.at:%Y-%m-%d %H:%M} UTC: one entity and one source per table.",
        "# Every choice says why in a comment; check them, then `straw check` and `straw run --once`.",
    ]
    if discovery.literal_password:
        lines.append(f"# The password is not written here: export {PASSWORD_VAR} (or use ${{file:…}}).")
    lines += [
        "# For completion and checks in an editor: straw schema > straw.schema.json",
        "# yaml-language-server: $schema=straw.schema.json",
        "",
        "redis:",
        f"  url: {_scalar(REDIS_URL)}",
        "outbox:",
        "  path: var/outbox.db              # relative to this file's folder",
        "",
        "entities:",
    ]
    for found, name in zip(chosen, names, strict=True):
        assert found.proposal is not None
        lines += _entity(found.table, found.proposal, name)
    lines += ["", "sources:"]
    for found, name in zip(chosen, names, strict=True):
        assert found.proposal is not None
        lines += _source(discovery, found.table, found.proposal, name, stream_prefix)
    skipped = [f.table for f in discovery.found if f.proposal is None]
    if skipped:
        lines += ["", "# Not drafted (add them with --tables NAME,…):"]
        lines += [f"#   {'view' if t.view else 'table'} {_said(t.name)}{_size(t)}" for t in skipped]
    return "\n".join(lines) + "\n"


def _unique_names(tables: Sequence[str]) -> list[str]:
    out: list[str] = []
    for table in tables:
        name, n = name_for(table), 2
        while name in out:
            name, n = f"{name_for(table)}-{n}", n + 1
        out.append(name)
    return out


def _size(table: TableInfo) -> str:
    if table.rows is None:
        return ""
    return f", {'about ' if table.estimated else ''}{table.rows:,} rows"


def _entity(table: TableInfo, proposal: Proposal, name: str) -> list[str]:
    fields = field_names(table)
    kind = "view" if table.view else "table"
    keys = ", ".join(_scalar(fields[k]) for k in proposal.key)
    lines = [f"  {_scalar(name)}:                    # {kind} {_said(table.name)}{_size(table)}", f"    key: [{keys}]",
             "    fields:"]
    unique = {tuple(u) for u in table.unique}
    for column in table.columns:
        draft = field_for(column.type)
        notes = [column.sql + ("" if column.nullable else " NOT NULL")]
        if column.name in table.primary_key:
            notes.append("primary key")
        elif (column.name,) in unique:
            notes.append("unique")
        if draft.type is None:
            lines.append(f"      # {_scalar(fields[column.name])}: left out, {_said(column.sql)} is not a type "
                         "straw maps (cast it in a `query` to text or a number)")
            continue
        lines.append(f"      {_scalar(fields[column.name])}: {_type(draft)}    # {_said(', '.join(notes))}"
                     + _type_note(draft))
    return lines


def _type(draft: DraftField) -> str:
    assert draft.type is not None
    if draft.type is FieldType.DECIMAL and draft.scale is not None:
        return f"{{type: decimal, scale: {draft.scale}}}"
    return draft.type.value


def _type_note(draft: DraftField) -> str:
    if draft.char:
        return " (blank-padded: the source trims with trim_char)"
    if draft.binary:
        return " (base64 in the event; if it holds text, make it `string`: decoded with the source's encoding)"
    return ""


def _source(discovery: Discovery, table: TableInfo, proposal: Proposal, name: str, prefix: str) -> list[str]:
    fields = field_names(table)
    drafts = {c.name: field_for(c.type) for c in table.columns}
    lines = [f"  - name: {_scalar(name)}", f"    url: {_scalar(discovery.url)}"]
    if discovery.schema:
        lines.append(f"    schema: {_scalar(discovery.schema)}")
    lines.append(f"    table: {_scalar(table.name)}")
    lines += [f"    # {line}" for reason in proposal.reasons
              for line in textwrap.wrap(_said(reason), 110, subsequent_indent="  ", break_on_hyphens=False)]
    lines.append(f"    mode: {proposal.mode}")
    if proposal.incrementing_column:
        lines.append(f"    incrementing_column: {_scalar(proposal.incrementing_column)}")
    if proposal.timestamp_column and proposal.key_column:
        lines.append(f"    timestamp_column: {_scalar(proposal.timestamp_column)}")
        lines.append(f"    key_column: {_scalar(proposal.key_column)}")
    if proposal.sweep:
        lines.append(f"    deletes: {{sweep_interval: {SWEEP_INTERVAL}}}    # key sweep: rows deleted from the "
                     f"table become `deleted` events (reads the {', '.join(proposal.key)} index once an hour)")
    if proposal.mode == "snapshot":
        lines.append(f"    poll_interval: {snapshot_interval(table.rows)}               # a listing reads the whole "
                     "table: not too often")
    else:
        lines.append("    poll_interval: 5s")
    chars = [c for c, d in drafts.items() if d.char]
    if chars:
        lines.append(f"    trim_char: true                  # CHAR padding of {_said(', '.join(chars))}")
    if any(d.binary for d in drafts.values()):
        lines.append("    encoding: utf-8                  # codec of text kept in byte columns (cp1252, latin-1…)")
    if any(d.type is FieldType.DATETIME for d in drafts.values()):
        lines.append("    timezone: UTC                    # the zone naive timestamps are in: an IANA name, "
                     "e.g. Europe/Amsterdam")
    lines.append(f"    entity: {_scalar(name)}")
    lines.append(f"    stream: {_scalar(prefix + name)}")
    lowered = [c.lower() for c in fields]
    # Mapped where the name differs, and where two columns differ only in case (the lookup ignores case).
    renamed = {f: c for c, f in fields.items()
               if (f.lower() != c.lower() or lowered.count(c.lower()) > 1) and drafts[c].type is not None}
    if renamed:
        lines.append("    mapping:")
        lines += [f"      {_scalar(f)}: {_scalar(c)}" for f, c in renamed.items()]
    lines.append("")
    return lines


def summary(found: Sequence[Found]) -> list[tuple[str, str, str, str, str]]:
    """(relation, rows, primary key, unique indexes, proposed mode) per table, for the terminal."""
    rows = []
    for item in found:
        t = item.table
        count = "" if t.rows is None else (f"~{t.rows:,}" if t.estimated else f"{t.rows:,}")
        unique = "; ".join(", ".join(u) for u in t.unique)
        mode = item.proposal.mode if item.proposal else "-"
        rows.append((("view " if t.view else "") + t.name, count, ", ".join(t.primary_key), unique, mode))
    return rows
