"""The coercers' fast paths give what the plain ones give: text of decimals, fold and zone of datetimes."""

from __future__ import annotations

import datetime as dt
from decimal import ROUND_HALF_EVEN, Context, Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from straw.coerce import coercer, datetime, decimal, unchanged_type
from straw.config import FieldSpec, FieldType


@settings(max_examples=3000, deadline=None)
@given(
    coefficient=st.integers(min_value=-(10**38), max_value=10**38),
    exponent=st.integers(min_value=-40, max_value=40),
    scale=st.integers(min_value=0, max_value=12),
)
def test_decimal_text_is_format_f_of_the_rounded_value(coefficient: int, exponent: int, scale: int) -> None:
    value = Decimal(coefficient).scaleb(exponent)
    try:
        got = decimal(scale)(value)
    except ValueError:
        return  # too many digits: refused as before, not what this test is about
    rounded = value.quantize(Decimal(1).scaleb(-scale), rounding=ROUND_HALF_EVEN, context=Context(prec=100))
    assert got == format(rounded, "f")


@settings(max_examples=2000, deadline=None)
@given(moment=st.datetimes(), zone=st.sampled_from(["Europe/Amsterdam", "America/New_York", "UTC"]))
def test_naive_datetime_gets_the_zone_and_keeps_its_fold(moment: dt.datetime, zone: str) -> None:
    tz = ZoneInfo(zone)
    got = datetime(tz)(moment)
    expected = moment.replace(tzinfo=tz)
    assert type(got) is dt.datetime and got.tzinfo is tz
    assert (got.fold, got.isoformat()) == (expected.fold, expected.isoformat())
    assert got.replace(tzinfo=None) == moment


def test_ambiguous_hour_keeps_fold() -> None:
    tz = ZoneInfo("Europe/Amsterdam")
    for fold in (0, 1):
        got = datetime(tz)(dt.datetime(2026, 10, 25, 2, 30, fold=fold))
        assert got.fold == fold
        assert got.isoformat() == f"2026-10-25T02:30:00+0{2 - fold}:00"


SAMPLES: dict[FieldType, list[Any]] = {
    FieldType.STRING: ["", " padded  ", "é\x00\U0001f600", b"bytes", 7, Decimal("1.5"), 2.5, dt.date(2026, 1, 1)],
    FieldType.INTEGER: [0, -(2**70), True, False, Decimal("5"), 5.0, " 12 "],
    FieldType.DATE: [dt.date(2026, 1, 1), dt.datetime(2026, 1, 1), "2026-01-01"],
    FieldType.BOOLEAN: [True, False, "J", 1, Decimal("0")],
    FieldType.DECIMAL: [Decimal("1.5"), 1],
    FieldType.DATETIME: [dt.datetime(2026, 1, 1)],
}


@pytest.mark.parametrize("trim", [False, True])
@pytest.mark.parametrize("kind", list(SAMPLES))
def test_unchanged_type_is_what_the_coercer_returns_as_is(kind: FieldType, trim: bool) -> None:
    """The mapper skips a column's coercer when every value has exactly `unchanged_type`: it must return each as is."""
    spec = FieldSpec(type=kind)
    passes = unchanged_type(spec, trim)
    convert = coercer(spec, ZoneInfo("Europe/Amsterdam"), "utf-8", trim)
    for value in SAMPLES[kind]:
        if passes is not None and type(value) is passes:
            assert convert(value) is value
