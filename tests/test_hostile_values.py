"""Any value: a record with the input's exact value, or a dead letter with a reason; never an exception.

Property-based: every canonical type is fed hostile values (huge and tiny numbers,
NaN/±Inf, out-of-range dates, wrong types, invalid text, bytes, nested structures)
through `Mapper.map` and `Mapper.map_keyed` and on into a real outbox. Then the same
on real PostgreSQL through `straw run --once` and `straw preview`.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import math
import tempfile
from decimal import Context, Decimal
from functools import partial
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from outbox.store import Outbox
from straw.config import EntitySpec
from straw.mapping import Mapper, raw_json
from straw.source import RawBatch
from tests.helpers import dead_letters, orders_config, read_stream, run_once
from tests.test_cli import invoke
from tests.test_db_undecodable import legacy_orders

ZONE = ZoneInfo("Europe/Amsterdam")
ENTITY = EntitySpec.model_validate(
    {
        "key": ["id"],
        "fields": {
            "id": "integer",
            "text": "string",
            "blob": "bytes",
            "count": "integer",
            "money": {"type": "decimal", "scale": 2},
            "exact": "decimal",
            "flag": "boolean",
            "day": "date",
            "at": "datetime",
            "doc": "json",
        },
    }
)
FIELDS = [name for name in ENTITY.fields if name != "id"]
COLUMNS = ("id", *FIELDS)

_json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8), st.decimals(), st.binary(max_size=4)
)
HOSTILE = st.one_of(
    st.none(),
    st.integers(),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.just(10**5000),  # beyond Python's digit limit for text
    st.floats(),  # NaN, ±Inf, tiny and huge
    st.decimals(),  # NaN, sNaN, ±Infinity, any exponent
    st.decimals(min_value=Decimal(-(10**40)), max_value=Decimal(10**40), places=3),
    st.sampled_from([Decimal("1E+999999"), Decimal("1E-999999"), Decimal("-0"), Decimal("sNaN"),
                     Decimal("123456789012345678901234567.5")]),
    st.text(),  # lone surrogates included
    st.sampled_from(["", " ", "NaN", "Infinity", "1e400", "0000-00-00", "10000-01-01", "2024-02-30", "9999-12-31",
                     "12345678901234567890123456789012", '{"a": NaN}', "[1, 2", '{"n": 1e400}', "\ud800", "ja"]),
    st.binary(),
    st.dates(),
    st.datetimes(timezones=st.one_of(st.none(), st.timezones())),
    st.times(),
    st.timedeltas(),
    st.booleans(),
    st.recursive(_json_leaf, lambda inner: st.lists(inner, max_size=3)
                 | st.dictionaries(st.one_of(st.text(max_size=4), st.integers()), inner, max_size=3), max_leaves=6),
    st.sets(st.integers(), max_size=3),
    st.builds(object),
)
ROWS = st.lists(st.tuples(*(HOSTILE for _ in FIELDS)), min_size=1, max_size=6)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def mapper() -> Mapper:
    return Mapper(source_uri="straw/t/hostile", source_name="hostile", entity_name="thing", entity=ENTITY,
                  mapping={}, zone=ZONE)


def _batch(rows: list[tuple[Any, ...]], keyed: bool = False) -> RawBatch:
    full = [(i + 1, *row) for i, row in enumerate(rows)]
    positions = [orjson.dumps([1, i + 1] if keyed else [i + 1]).decode() for i in range(len(full))]
    return RawBatch(COLUMNS, full, positions, keyed=keyed, complete=keyed, end="[1]" if keyed else None)


def _number(value: Any) -> Decimal | None:
    """The input as an exact number, if it is one."""
    if isinstance(value, bool):
        return Decimal(int(value))
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, float):
        return Decimal(repr(value)) if math.isfinite(value) else None
    if isinstance(value, Decimal):
        return value if value.is_finite() else None
    if isinstance(value, (str, bytes)):
        try:
            number = Decimal(value.strip() if isinstance(value, str) else value.decode().strip())
        except Exception:
            return None
        return number if number.is_finite() else None
    return None


def assert_exact(name: str, raw: Any, published: Any) -> None:
    """The published value is the input's exact value, as the field's type defines it."""
    if raw is None:
        assert published is None, (name, raw, published)
        return
    assert published is not None, f"{name}: {raw!r} published as null"
    if name in ("count", "exact", "money"):
        number = _number(raw)
        assert number is not None, f"{name}: {raw!r} is no number, published as {published!r}"
        value = Decimal(str(published))
        if name == "money":
            assert value == number.quantize(Decimal("0.01"), context=Context(prec=2000)), (raw, published)
            assert value.as_tuple().exponent == -2
        else:
            assert value == number, (name, raw, published)
    elif name == "text":
        if isinstance(raw, str):
            assert published == raw
        elif isinstance(raw, bytes):
            assert published == raw.decode("utf-8")
        elif isinstance(raw, float):
            assert published == repr(raw)
        elif isinstance(raw, (int, Decimal)) and not isinstance(raw, bool):
            assert published == str(raw)
        else:
            assert published == raw.isoformat()
    elif name == "blob":
        assert base64.b64decode(published) == (raw if isinstance(raw, bytes) else raw.encode("utf-8"))
    elif name == "flag":
        assert isinstance(published, bool)
        if isinstance(raw, (bool, int, Decimal)):
            assert published == bool(raw)
    elif name == "day":
        day = dt.date.fromisoformat(published)
        expected = raw.date() if isinstance(raw, dt.datetime) else raw
        assert day == (dt.date.fromisoformat(raw.strip()) if isinstance(raw, str) else expected)
    elif name == "at":
        moment = dt.datetime.fromisoformat(published)
        source = dt.datetime.fromisoformat(raw.strip()) if isinstance(raw, str) else raw
        assert moment == (source.replace(tzinfo=ZONE) if source.tzinfo is None else source)
        assert moment.utcoffset() == (source.replace(tzinfo=ZONE) if source.tzinfo is None else source).utcoffset()
    elif name == "doc":
        if isinstance(raw, (str, bytes)):
            assert published == json.loads(raw, parse_float=float)
            return
        if isinstance(raw, Decimal):
            assert Decimal(published) == raw
            return
        assert published == raw


@SETTINGS
@given(rows=ROWS)
def test_map_gives_each_row_an_exact_record_or_a_dead_letter(rows: list[tuple[Any, ...]]) -> None:
    out = mapper().map(_batch(rows))
    assert len(out.events) + len(out.dead) == len(rows)
    for dead in out.dead:
        assert dead.reason and "\n" not in dead.reason and "Traceback" not in dead.reason
        raw = orjson.loads(dead.raw)  # strict JSON, whatever the row held
        assert list(raw) == list(COLUMNS)
    for position, event in out.events:
        data = orjson.loads(event)["data"]
        raw_row = rows[orjson.loads(position)[0] - 1]
        for name, value in zip(FIELDS, raw_row, strict=True):
            assert_exact(name, value, data.get(name))


@SETTINGS
@given(rows=ROWS)
def test_map_keyed_into_a_real_outbox_never_raises(rows: list[tuple[Any, ...]]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        outbox, m = Outbox(Path(directory) / "o.db"), mapper()
        try:
            batch = _batch(rows, keyed=True)
            mapped = m.map_keyed(batch, partial(outbox.digests, "hostile"))
            outbox.append_keyed("hostile", "s", mapped.changes, [(d.position, d.reason, d.raw) for d in mapped.dead],
                                batch.next_position, len(batch.rows), complete=True, encode=m.encode,
                                unchanged=[i for _k, i in mapped.unchanged])
            events = [orjson.loads(r.event) for r in outbox.events()]
            assert len(events) + len(mapped.dead) == len(rows)
            for event in events:
                raw_row = rows[int(event["subject"]) - 1]
                for name, value in zip(FIELDS, raw_row, strict=True):
                    assert_exact(name, value, event["data"].get(name))
        finally:
            outbox.close()


def test_dead_letter_raw_rows_keep_nan_and_infinities_as_strings() -> None:
    raw = orjson.loads(raw_json(("a", "b", "c", "d", "e"), (math.nan, math.inf, -math.inf, Decimal("NaN"), 1.5)))
    assert raw == {"a": "NaN", "b": "Infinity", "c": "-Infinity", "d": "NaN", "e": 1.5}
    out = mapper().map(_batch([(None, None, math.nan, None, None, None, None, None, None)]))
    assert len(out.dead) == 1
    assert orjson.loads(out.dead[0].raw)["count"] == "NaN"


def test_a_numeric_beyond_the_decimal_context_is_exact_or_a_dead_letter() -> None:
    """27+ integer digits in a decimal field with `scale` ended the process (InvalidOperation from quantize)."""
    big = Decimal("123456789012345678901234567890.125")
    out = mapper().map(_batch([(None, None, None, big, None, None, None, None, None),
                               (None, None, None, Decimal(10) ** 1200, None, None, None, None, None)]))
    assert [orjson.loads(e)["data"]["money"] for _p, e in out.events] == ["123456789012345678901234567890.12"]
    assert [d.reason for d in out.dead] == [
        "field 'money' (column 'money'): cannot read Decimal('1.000000000000000000000000000E+1200') (Decimal) as "
        "decimal: more than 1000 digits"
    ]


def test_a_huge_numeric_on_postgresql_is_a_dead_letter_the_rest_delivered(
    tmp_path: Path, pg_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    legacy_orders(
        pg_url,
        5,
        'ALTER TABLE "ORDERS" ALTER COLUMN "AMOUNT" TYPE NUMERIC',
        'UPDATE "ORDERS" SET "AMOUNT" = 123456789012345678901234567890.125 WHERE "ORDER_NO" = 2',
        'UPDATE "ORDERS" SET "AMOUNT" = 10::numeric ^ 1200 WHERE "ORDER_NO" = 4',
    )
    path = orders_config(tmp_path, db_url=pg_url, redis_url=redis_url, stream=stream_name)

    result = run_once(path)
    assert not result.errors
    events = {e["event"]["subject"]: e["event"]["data"] for e in read_stream(redis_client, stream_name)}
    assert sorted(events) == ["1", "2", "3", "5"]
    assert events["2"]["amount"] == "123456789012345678901234567890.12"
    [dead] = dead_letters(tmp_path)
    assert dead["position"] == "[4]" and "more than 1000 digits" in dead["reason"]

    shown = invoke("preview", "orders", "--config", str(path))
    assert shown.exit_code == 0, shown.output
    flat = "".join(shown.stdout.splitlines())
    assert "dead letter at [4]: field 'amount' (column 'AMOUNT'): cannot read Decimal(" in flat
    assert "as decimal: more than 1000 digits" in flat and "Traceback" not in shown.output
