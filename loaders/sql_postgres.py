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
import re
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import orjson
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


def batch_json(rows: Sequence[tuple[str, str, int, bool, dict[str, Any]]]) -> str:
    """Rows of (stream, key hash, seq, deleted, typed data) as the statement's JSON parameter."""
    return orjson.dumps([{"s": s, "h": h, "q": q, "d": d, "r": r} for s, h, q, d, r in rows],
                        default=_json_default).decode()


class PgApply:
    """The statement that applies one entity's fresh changes of a batch, built once per table."""

    def __init__(self, conn: Connection, table: Table, key: Sequence[str], versions: Table, entity: str) -> None:
        quote = conn.dialect.identifier_preparer
        target = quote.format_table(table)
        names = [c.name for c in table.c]
        kinds = {c.name: _TYPMOD.sub("", c.type.compile(dialect=conn.dialect)) for c in table.c}
        columns = ", ".join(quote.quote(n) for n in names)
        typed = ", ".join(f"{quote.quote(n)} {kinds[n]}" for n in names)
        keys = ", ".join(f"{quote.quote(k)} {kinds[k]}" for k in key)
        others = [n for n in names if n not in key]
        action = ("DO UPDATE SET " + ", ".join(f"{quote.quote(n)} = EXCLUDED.{quote.quote(n)}" for n in others)
                  if others else "DO NOTHING")
        same_key = " AND ".join(f"t.{quote.quote(k)} = p.{quote.quote(k)}" for k in key)
        self.entity = entity
        self.sql = (
            # A correlated subquery, not a join: one index lookup per key whatever the planner believes of
            # a fresh `straw_versions` without statistics (a hash join would scan all of it every batch).
            "WITH f AS MATERIALIZED ("
            "SELECT x.s, x.h, x.q, x.d, x.r FROM json_to_recordset(%(rows)s::json) "
            "AS x(s text, h text, q bigint, d boolean, r json) "
            f"WHERE x.q > COALESCE((SELECT v.seq FROM {quote.format_table(versions)} v "
            "WHERE v.stream = x.s AND v.entity = %(entity)s AND v.key_hash = x.h), 0)), "
            f"moved AS (INSERT INTO {quote.format_table(versions)} (stream, entity, key_hash, seq, deleted) "
            "SELECT s, %(entity)s, h, q, d FROM f "
            "ON CONFLICT (stream, entity, key_hash) DO UPDATE SET seq = EXCLUDED.seq, deleted = EXCLUDED.deleted), "
            f"upserted AS (INSERT INTO {target} ({columns}) SELECT {', '.join(f'p.{quote.quote(n)}' for n in names)} "
            f"FROM f CROSS JOIN LATERAL json_to_record(f.r) AS p({typed}) WHERE NOT f.d "
            f"ON CONFLICT ({', '.join(quote.quote(k) for k in key)}) {action}) "
            f"DELETE FROM {target} AS t USING f CROSS JOIN LATERAL json_to_record(f.r) AS p({keys}) "
            f"WHERE f.d AND {same_key}"
        )

    def run(self, conn: Connection, rows: Sequence[tuple[str, str, int, bool, dict[str, Any]]]) -> None:
        """Apply `rows` (one per key: the batch's last change of it) unless their key has a newer version."""
        conn.exec_driver_sql(self.sql, {"rows": batch_json(rows), "entity": self.entity})


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
