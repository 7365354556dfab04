"""Parsers and page decoding of the scrape adapter: what legacy UIs show -> canonical values."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest

from adapters.scrape.page import decode
from adapters.scrape.parse import parser
from straw.config_scrape import ParseSpec


def parse(text: str, **spec: object) -> object:
    return parser(ParseSpec.model_validate(spec))(text)


@pytest.mark.parametrize(
    ("text", "spec", "expected"),
    [
        ("1.234,56", {"locale": "nl"}, Decimal("1234.56")),
        ("1,234.56", {"locale": "en"}, Decimal("1234.56")),
        ("(12.00)", {"locale": "en"}, Decimal("-12.00")),
        ("-1.234,50 €", {"locale": "de"}, Decimal("-1234.50")),
        ("€ 1.234,56", {"locale": "nl"}, Decimal("1234.56")),
        ("12,50-", {"locale": "nl"}, Decimal("-12.50")),
        ("USD 3,000", {"locale": "en"}, Decimal("3000")),
        ("1 234,5", {"locale": "fr"}, Decimal("1234.5")),
        ("1'234.50 CHF", {"decimal": "."}, Decimal("1234.50")),
    ],
)
def test_locale_numbers_and_currency(text: str, spec: dict[str, object], expected: Decimal) -> None:
    assert parse(text, type="currency", **spec) == expected


def test_number_failures_name_the_text() -> None:
    with pytest.raises(ValueError, match="no number"):
        parse("n/a", type="decimal")
    with pytest.raises(ValueError, match="1,2,3"):
        parse("1,2,3", type="decimal", locale="nl")
    with pytest.raises(ValueError, match="fraction"):
        parse("12,5", type="integer", locale="nl")
    assert parse("1.234", type="integer", locale="de") == 1234


@pytest.mark.parametrize(
    ("text", "spec", "expected"),
    [
        ("24-11-2026", {"format": "%d-%m-%Y"}, dt.date(2026, 11, 24)),
        ("24. nov. 2026", {"locale": "da", "format": "%d. %b %Y"}, dt.date(2026, 11, 24)),
        ("3. maj 2025", {"locale": "da", "format": "%d. %b %Y"}, dt.date(2025, 5, 3)),
        ("1 mrt. 2024", {"locale": "nl", "format": "%d %b %Y"}, dt.date(2024, 3, 1)),
        ("24 Dezember 2026", {"locale": "de", "format": "%d %B %Y"}, dt.date(2026, 12, 24)),
        ("2026-11-24", {}, dt.date(2026, 11, 24)),
    ],
)
def test_dates_in_formats_and_locales(text: str, spec: dict[str, object], expected: dt.date) -> None:
    assert parse(text, type="date", **spec) == expected


def test_datetimes_are_naive_for_the_source_zone() -> None:
    value = parse("24 november 2026  13:05", type="datetime", locale="nl", format="%d %B %Y %H:%M")
    assert value == dt.datetime(2026, 11, 24, 13, 5)
    with pytest.raises(ValueError, match="as a datetime"):
        parse("gisteren", type="datetime", locale="nl", format="%d %B %Y %H:%M")


def test_booleans_from_words() -> None:
    assert [parse(w, type="boolean") for w in ("Ja", "nee", "Yes", "NO", "x", "✓")] == [
        True, False, True, False, True, True
    ]
    assert parse("Actief", type="boolean", true=["actief"], false=["inactief"]) is True
    assert parse("Inactief", type="boolean", true=["actief"], false=["inactief"]) is False
    with pytest.raises(ValueError, match="add the word"):
        parse("misschien", type="boolean")


def test_unknown_locale_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="unknown locale"):
        ParseSpec.model_validate({"type": "decimal", "locale": "xx_YY"})


def test_windows_1252_pages_decode_declared_or_not() -> None:
    text = "„Grüße“ – 1.234,56 €"  # noqa: RUF001 - all in windows-1252's 0x80-0x9F
    body = f"<html><body>{text}</body></html>".encode("cp1252")
    assert text in decode(body, "text/html; charset=windows-1252")
    # latin-1 declared but cp1252 sent, as old servers do: read like a browser would.
    assert text in decode(body, "text/html; charset=ISO-8859-1")
    assert text in decode(body, None)  # undeclared, not UTF-8
    meta = b'<html><head><meta http-equiv="Content-Type" content="text/html; charset=windows-1252"></head>'
    assert text in decode(meta + body, "text/html")
    assert decode("Zoë".encode(), "text/html") == "Zoë"
    assert decode("Zoë".encode("cp1252"), "text/html; charset=utf-8", forced="cp1252") == "Zoë"


def test_parse_errors_name_the_configured_formats_and_locale() -> None:
    # Was: "cannot read '01/02/23 16:00:00' (str) as datetime: expected ISO 8601" although a format was set.
    with pytest.raises(ValueError) as caught:
        parse("01/02/23 16:00:00", type="datetime", locale="nl", format=["%d-%m-%Y %H:%M", "%d %B %Y %H:%M"])
    assert str(caught.value).startswith(
        "cannot read '01/02/23 16:00:00' as a datetime (format '%d-%m-%Y %H:%M' or '%d %B %Y %H:%M', locale 'nl')"
    )
    with pytest.raises(ValueError, match=r"as a date \(format ISO 8601, locale 'en'\)"):
        parse("24-11-2026", type="date")
    with pytest.raises(ValueError, match=r"decimal separator ',', locale 'de'"):
        parse("1,2,3", type="decimal", locale="de", decimal=",")
    with pytest.raises(ValueError, match=r"no number in 'n/a' \(locale 'nl'\)"):
        parse("n/a", type="currency", locale="nl")
    # a list of formats: each tried in order
    assert parse("24 november 2026", type="date", locale="nl", format=["%d-%m-%Y", "%d %B %Y"]) == dt.date(2026, 11, 24)
