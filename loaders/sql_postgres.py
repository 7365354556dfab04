"""PostgreSQL: a batch of one entity applied in one statement, its key versions checked and moved by the server.

The batch goes to the server as one JSON document (orjson writes it in microseconds; psycopg's text arrays
cost a regular expression per value). One statement then reads it with `json_to_recordset`, keeps the changes
newer than their key's version in `straw_versions` (an index lookup per key, in the server), upserts the
kept rows, deletes the kept deletes and moves the versions: no round trip per step, and the versions lookup
sees every batch committed before the caller's lock on `straw_applied` was granted (READ COMMITTED takes the
statement's snapshot when it starts).

Values are converted by the server from their JSON text to the declared base type (NUMERIC, TIMESTAMPTZ, …)
and then assigned to the column, so a column's own limits (scale, length, a narrower type an operator chose)
apply as for any INSERT: a value that does not fit fails its record, never truncated.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import orjson
from psycopg.types.json import Json
from sqlalchemy import Table
from sqlalchemy.engine import Connection

_TYPMOD = re.compile(r"\s*\(.*?\)")  # NUMERIC(38, 2) -> NUMERIC: the column applies its own scale and length


def _json_default(value: Any) -> Any:
    """Typed values orjson does not write itself, as PostgreSQL's input functions read them."""
    if isinstance(value, Decimal):
        return format(value, "f")  # never an exponent: exact for NUMERIC's input
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "\\x" + bytes(value).hex()  # bytea's hex input format
    if isinstance(value, dt.date):  # a subclass orjson does not take as is
        return value.isoformat()
    raise TypeError(f"cannot send a {type(value).__name__} to PostgreSQL")


def _as_is(document: Any) -> bytes:
    return document  # type: ignore[no-any-return]  # the JSON orjson wrote already


Row = tuple[str, str, int, bool, dict[str, Any]]  # stream, key hash, seq, deleted, typed data


class PgApply:
    """The statement that applies one entity's fresh changes of a batch, built once per table.

    Each change is one flat JSON object: the entity's fields and four of straw's (stream, key hash, seq,
    deleted) under names no field has, so the server parses each change once, into typed columns.
    """

    def __init__(self, conn: Connection, table: Table, key: Sequence[str], versions: Table, entity: str) -> None:
        quote = conn.dialect.identifier_preparer
        target = quote.format_table(table)
        names = [c.name for c in table.c]
        prefix = "_straw_"
        while any(n.startswith(prefix) for n in names):
            prefix = "_" + prefix
        self.meta = s, h, q, d = (f"{prefix}s", f"{prefix}h", f"{prefix}q", f"{prefix}d")
        kinds = {c.name: _TYPMOD.sub("", c.type.compile(dialect=conn.dialect)) for c in table.c}
        columns = ", ".join(quote.quote(n) for n in names)
        typed = ", ".join(f"{quote.quote(n)} {kinds[n]}" for n in names)
        others = [n for n in names if n not in key]
        action = ("DO UPDATE SET " + ", ".join(f"{quote.quote(n)} = EXCLUDED.{quote.quote(n)}" for n in others)
                  if others else "DO NOTHING")
        same_key = " AND ".join(f"t.{quote.quote(k)} = f.{quote.quote(k)}" for k in key)
        versions_table = quote.format_table(versions)
        self.entity = entity
        self.sql = (
            # A correlated subquery, not a join: one index lookup per key whatever the planner believes of
            # a fresh `straw_versions` without statistics (a hash join would scan all of it every batch).
            f"WITH f AS MATERIALIZED (SELECT * FROM json_to_recordset(%(rows)s::json) "
            f"AS x({s} text, {h} text, {q} bigint, {d} boolean, {typed}) "
            f"WHERE {q} > COALESCE((SELECT v.seq FROM {versions_table} v "
            f"WHERE v.stream = {s} AND v.entity = %(entity)s AND v.key_hash = {h}), 0)), "
            f"moved AS (INSERT INTO {versions_table} (stream, entity, key_hash, seq, deleted) "
            f"SELECT {s}, %(entity)s, {h}, {q}, {d} FROM f "
            "ON CONFLICT (stream, entity, key_hash) DO UPDATE SET seq = EXCLUDED.seq, deleted = EXCLUDED.deleted), "
            f"upserted AS (INSERT INTO {target} ({columns}) SELECT {columns} FROM f WHERE NOT {d} "
            f"ON CONFLICT ({', '.join(quote.quote(k) for k in key)}) {action}) "
            f"DELETE FROM {target} AS t USING f WHERE f.{d} AND {same_key}"
        )

    def batch_json(self, rows: Sequence[Row]) -> bytes:
        """The statement's JSON parameter: one object per change, its data and straw's four values."""
        s, h, q, d = self.meta
        changes = [{**r, s: stream, h: hashed, q: seq, d: deleted} for stream, hashed, seq, deleted, r in rows]
        try:
            return orjson.dumps(changes, default=_json_default)
        except TypeError:  # orjson stops at 64-bit integers (a json field's, an integer's that BIGINT refuses)
            return json.dumps(changes, default=_json_default, separators=(",", ":"), ensure_ascii=False).encode()

    def run(self, conn: Connection, rows: Sequence[Row]) -> None:
        """Apply `rows` (one per key: the batch's last change of it) unless their key has a newer version."""
        # psycopg takes the bytes orjson wrote, typed json (not decoded here and encoded again); another driver
        # (psycopg2, for a bare postgresql:// URL) takes the text.
        document = self.batch_json(rows)
        param = Json(document, dumps=_as_is) if conn.dialect.driver == "psycopg" else document.decode()
        conn.exec_driver_sql(self.sql, {"rows": param, "entity": self.entity})


def move_applied(conn: Connection, applied: Table, stream: str, top: int) -> None:
    """Lock the stream's `straw_applied` row (a second loader's batch waits here) and raise it to `top`,
    creating it if missing: in this transaction, so a batch that rolls back leaves no row behind it.

    First in the transaction: the batch's statements then see every batch committed before this one.
    """
    quote = conn.dialect.identifier_preparer
    conn.exec_driver_sql(
        f"INSERT INTO {quote.format_table(applied)} AS a (stream, seq) VALUES (%(stream)s, %(top)s) "
        "ON CONFLICT (stream) DO UPDATE SET seq = GREATEST(a.seq, EXCLUDED.seq)",
        {"top": top, "stream": stream})
