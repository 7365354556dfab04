"""`straw discover URL`: read a legacy database's catalog and propose one source per table.

Connects through the same read-only engine as a poll (so a SQLite file is opened
`mode=ro`, PostgreSQL and MariaDB sessions are READ ONLY), reads only the catalog,
the row counts and a few MIN/MAX probes, and never writes.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from adapters.db import odbc
from adapters.db.catalog import TableInfo, describe_relation, list_relations
from adapters.db.engine import make_engine
from adapters.db.propose import Proposal, propose
from straw.config_load import ConfigError, Problem, expand_value
from straw.redact import register_secret

# A password typed on the command line is not written into the draft: this variable stands for it.
PASSWORD_VAR = "STRAW_DB_PASSWORD"
_URL_PASSWORD = re.compile(r"^(?P<head>[a-z][a-z0-9+.-]*://[^:/?#@\s]*:)(?P<pw>[^@]*)(?P<tail>@)", re.I)
_ODBC_PASSWORD = re.compile(r"(?P<head>(?:^|;)\s*(?:pwd|password)\s*=\s*)(?P<pw>[^;]*)", re.I)


@dataclass(frozen=True)
class Found:
    table: TableInfo
    proposal: Proposal | None  # None for a view that was not asked for


@dataclass(frozen=True)
class Discovery:
    url: str  # as the draft writes it: `${VAR}` kept, a literal password replaced by ${STRAW_DB_PASSWORD}
    literal_password: bool
    schema: str | None
    found: Sequence[Found]
    at: dt.datetime


def draft_url(template: str) -> tuple[str, bool]:
    """The URL for the draft, and whether a literal password had to be replaced by `${STRAW_DB_PASSWORD}`."""
    pattern = _ODBC_PASSWORD if template.startswith(odbc.PREFIX) else _URL_PASSWORD
    found = pattern.search(template)
    if found is None or not found.group("pw") or "${" in found.group("pw"):
        return template, False
    return template[: found.start("pw")] + "${" + PASSWORD_VAR + "}" + template[found.end("pw"):], True


def discover(template: str, schema: str | None = None, tables: Sequence[str] = ()) -> Discovery:
    """Every table (and each view named in `tables`) of `schema`; `tables` narrows, case-insensitively."""
    url = expand_value(template, "url")
    written, literal = draft_url(template)
    if literal:
        found = (_ODBC_PASSWORD if template.startswith(odbc.PREFIX) else _URL_PASSWORD).search(url)
        if found:
            register_secret(found.group("pw"))
    wanted = {t.lower() for t in tables}
    engine = make_engine(url, read_only=True)
    try:
        with engine.connect() as conn:
            relations = list_relations(conn, schema)
            missing = sorted(wanted - {name.lower() for name, _ in relations})
            if missing:
                known = ", ".join(name for name, _ in relations) or "none"
                raise ConfigError([Problem("--tables", None, "", f"no table or view {', '.join(missing)} "
                                           f"in {'schema ' + schema if schema else 'the database'}; "
                                           f"it has: {known}")])
            out = []
            for name, view in relations:
                if not (name.lower() in wanted if wanted else not view):
                    # Named only: counting a view (or hundreds of tables not asked for) may cost a lot.
                    out.append(Found(TableInfo(schema, name, view, (), (), (), frozenset(), None), None))
                    continue
                info = describe_relation(conn, name, view, schema)
                out.append(Found(info, propose(conn, info)))
                conn.rollback()  # each table's probes in a transaction of their own: no snapshot held long
    finally:
        engine.dispose()
    return Discovery(written, literal, schema, out, dt.datetime.now(dt.UTC))


def write_draft(path: Path, text: str) -> None:
    """Never over an existing file: a draft must not replace a configuration someone has edited."""
    with path.open("x", encoding="utf-8") as handle:
        handle.write(text)
