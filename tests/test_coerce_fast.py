"""The coercers' fast paths give what the plain ones give: text of decimals, fold and zone of datetimes."""

from __future__ import annotations

import datetime as dt
from decimal import ROUND_HALF_EVEN, Context, Decimal
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st

from straw.coerce import datetime, decimal


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
