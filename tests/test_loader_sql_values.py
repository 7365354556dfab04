"""Hostile values through the SQL loader, every canonical type, on each target database: each record lands
exactly as it was published, or is a dead letter because its target cannot hold a value. Never a changed
value, never a dead letter for a value the target can hold, never an exception out of the loader."""

from __future__ import annotations

import base64
import datetime as dt
import json
import uuid
from decimal import Decimal
from typing import Any

import pytest
import redis
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, text

from tests.loader_helpers import xadd_events
from tests.test_loader_sql import load_once, sql_loader

INT64 = 2**63
FIELDS = {"order_no": "integer", "s": "string", "n": "integer", "d": {"type": "decimal", "scale": 2},
          "at": "datetime", "day": "date", "flag": "boolean", "doc": "json", "blob": "bytes"}

_TEXT = st.text(st.characters(codec="utf-8"), max_size=30)  # NUL included
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | _TEXT
    | st.floats(allow_nan=False, allow_infinity=False, width=64),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TEXT, inner, max_size=4),
    max_leaves=8,
)
_OFFSETS = st.integers(-(23 * 60 + 59), 23 * 60 + 59).map(lambda m: dt.timezone(dt.timedelta(minutes=m)))
_DATA = st.fixed_dictionaries({
    "s": st.none() | _TEXT,
    "n": st.none() | st.integers(-(2**70), 2**70),
    "d": st.decimals(min_value=Decimal("-1e30"), max_value=Decimal("1e30"), places=2, allow_nan=False),
    # Years 2..9998: the value read back must be a Python datetime in UTC too
    "at": st.none() | st.datetimes(dt.datetime(2, 1, 1), dt.datetime(9998, 12, 31), timezones=_OFFSETS),
    "day": st.none() | st.dates(),
    "flag": st.none() | st.booleans(),
    "doc": _JSON,
    "blob": st.none() | st.binary(max_size=40),
})


def _wire(key: int, data: dict[str, Any]) -> dict[str, Any]:
    """The record's data as straw publishes it (decimals and datetimes as text, bytes base64)."""
    return {"order_no": key, "s": data["s"], "n": data["n"], "d": format(data["d"], "f"),
            "at": None if data["at"] is None else data["at"].isoformat(),
            "day": None if data["day"] is None else data["day"].isoformat(), "flag": data["flag"],
            "doc": data["doc"], "blob": None if data["blob"] is None else base64.b64encode(data["blob"]).decode()}


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in [k, *_strings(v)]]
    return []


def _beyond(dialect: str, data: dict[str, Any]) -> str | None:
    """Which documented limit of the target a record's values pass, or None: the target holds them all."""
    if data["n"] is not None and not -INT64 <= data["n"] < INT64:
        return "BIGINT"  # SQLite's INTEGER is 64-bit too
    if dialect == "postgresql" and any("\x00" in s for s in [data["s"] or "", *_strings(data["doc"])]):
        return "NUL"  # PostgreSQL text and jsonb hold no NUL
    offset = data["at"].utcoffset() if data["at"] is not None else None
    if dialect == "postgresql" and offset is not None and abs(offset) > dt.timedelta(hours=15, minutes=59):
        return "offset"  # PostgreSQL reads offsets up to ±15:59 (no zone has more than ±14:00)
    return None


def _instant(value: Any) -> dt.datetime | None:
    if value is None:
        return None
    stamp = value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(value)
    return stamp if stamp.tzinfo is not None else stamp.replace(tzinfo=dt.UTC)


def _read_back(dialect: str, row: dict[str, Any]) -> dict[str, Any]:
    """A row as comparable values (each database's own spelling of the same value normalized)."""
    doc = row["doc"]
    if isinstance(doc, str) and dialect != "postgresql":
        doc = json.loads(doc)
    day = row["day"]
    return {"s": row["s"], "n": row["n"], "d": Decimal(str(row["d"])), "at": _instant(row["at"]),
            "day": dt.date.fromisoformat(day) if isinstance(day, str) else day,
            "flag": None if row["flag"] is None else bool(row["flag"]), "doc": _numbers(doc),
            "blob": None if row["blob"] is None else bytes(row["blob"])}


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.lists(st.tuples(st.integers(1, 3), _DATA), min_size=1, max_size=8))
def test_every_type_lands_exactly_or_is_a_dead_letter_because_the_target_cannot_hold_it(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, redis_client: redis.Redis, db_url: str,
    changes: list[tuple[int, dict[str, Any]]],
) -> None:
    stream = f"test.v{uuid.uuid4().hex[:10]}"
    table = f"v{uuid.uuid4().hex[:8]}"
    engine = create_engine(db_url)
    dialect = engine.dialect.name
    try:
        xadd_events(redis_client, stream, [("upserted", _wire(key, data)) for key, data in changes])
        config = sql_loader(tmp_path_factory.mktemp("v"), redis_url, stream, db_url, max_deliveries=1,
                            tables={"order": table})
        document = yaml.safe_load(config.read_text())
        document["entities"]["order"] = {"key": ["order_no"], "fields": FIELDS}
        config.write_text(yaml.safe_dump(document))
        load_once(config)
        dead = {int(f[b"seq"]): f[b"error"].decode() for _, f in redis_client.xrange(f"{stream}.dlq")}
        expected: dict[int, dict[str, Any]] = {}
        last = {key: seq for seq, (key, _data) in enumerate(changes, 1)}
        for seq, (key, data) in enumerate(changes, 1):
            beyond = _beyond(dialect, data)
            if seq in dead:  # never for a value the target holds
                assert beyond is not None, (seq, dead[seq], data)
            else:  # a change its key's next one supersedes in the same batch is not written: it cannot fail
                assert beyond is None or last[key] != seq, (seq, beyond, data)
                expected[key] = data
        with engine.connect() as conn:
            found = {r["order_no"]: _read_back(dialect, dict(r))
                     for r in conn.execute(text(f"SELECT * FROM {table}")).mappings()}
        wanted = {k: {f: _comparable(f, v) for f, v in d.items()} for k, d in expected.items()}
        assert set(found) == set(wanted)
        changed = [(k, f, found[k][f], v) for k, d in wanted.items() for f, v in d.items() if found[k][f] != v]
        assert changed == [], changed[:3]  # (key, field, what the target holds, what was published)
        assert redis_client.xpending(stream, "wh")["pending"] == 0
    finally:
        redis_client.delete(stream, f"{stream}.dlq")
        engine.dispose()


def _comparable(field: str, value: Any) -> Any:
    if field == "at" and value is not None:
        return value.astimezone(dt.UTC)
    if field == "doc":
        return _numbers(value)
    return value


def _numbers(value: Any) -> Any:
    """JSON numbers as the decimals they denote: jsonb keeps 1e308 as a numeric and gives it back as
    1000…0 (an int to Python), the same JSON number."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    return {k: _numbers(v) for k, v in value.items()}
