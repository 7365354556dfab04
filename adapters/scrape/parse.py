"""Text shown in a web UI -> canonical Python values (Decimal, int, date, datetime, bool).

The mapper then coerces these like database values, so a scraped amount and a
column amount end up the same on the wire. Each parser raises `ValueError` with
a readable reason; the caller decides what a failure means.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from functools import cache
from typing import Any
from zoneinfo import ZoneInfo

from babel import Locale
from babel.numbers import get_decimal_symbol

from straw.config_scrape import ParseSpec, ParseType

Parser = Callable[[str], Any]

_TRUE = frozenset({"1", "t", "true", "y", "yes", "on", "j", "ja", "x", "✓", "✔", "oui", "si", "sí", "da", "wahr"})
_FALSE = frozenset({"0", "f", "false", "n", "no", "off", "nee", "nein", "nej", "non", "-", "✗", "✘", "falsch"})
_MINUS = "-\u2212\u2013"  # hyphen, minus sign, en dash: all seen as minus in legacy reports
_NOT_NUMBER = re.compile(r"[^0-9.,]")
_DIGITS = re.compile(r"[0-9](?:.*[0-9])?", re.DOTALL)  # from the first digit to the last
_HAS_MINUS = re.compile(f"[{_MINUS}]")


def _locale(code: str) -> Locale:
    return Locale.parse(code.replace("-", "_"))


def number_parser(spec: ParseSpec) -> Callable[[str], Decimal]:
    point = spec.decimal or get_decimal_symbol(_locale(spec.locale))
    point = "," if point == "," else "."  # locales with an Arabic separator still write ASCII in legacy UIs
    group = "." if point == "," else ","

    def parse(text: str) -> Decimal:
        raw = text.strip()
        if raw.isascii() and raw.isdigit():  # most cells of an id or count column: nothing to untangle
            return Decimal(raw)
        negative = raw.startswith("(") and raw.endswith(")")
        stripped = raw.strip("()").strip()
        # A currency symbol or code may sit on either side of the sign: '-€ 12', '€ -12', '12- EUR'.
        digits = _DIGITS.search(stripped)
        if digits is None:
            raise ValueError(f"no number in {text!r} ({spec.describe()})")
        first, last = digits.span()
        after = stripped[last:].lstrip()
        if _HAS_MINUS.search(stripped, 0, first) or (after and after[0] in _MINUS):
            negative = not negative
        body = _NOT_NUMBER.sub("", digits.group()).replace(group, "")
        if body.count(point) > 1:
            raise ValueError(f"cannot read {text!r} as a number with decimal separator {point!r} ({spec.describe()})")
        try:
            value = Decimal(body.replace(point, "."))
        except InvalidOperation:
            raise ValueError(f"cannot read {text!r} as a number ({spec.describe()})") from None
        return -value if negative else value

    return parse


def integer_parser(spec: ParseSpec) -> Callable[[str], int]:
    number = number_parser(spec)

    def parse(text: str) -> int:
        raw = text.strip()
        if raw.isascii() and raw.isdigit():
            return int(raw)
        value = number(text)
        if value != value.to_integral_value():
            raise ValueError(f"{text!r} has a fraction; parse it as decimal ({spec.describe()})")
        return int(value)

    return parse


@cache
def _month_names(locale: str) -> tuple[tuple[str, int], ...]:
    """Every way the locale writes a month (wide, abbreviated, with and without the dot), longest first."""
    loc = _locale(locale)
    names: dict[str, int] = {}
    for context in ("format", "stand-alone"):
        for width in ("wide", "abbreviated"):
            for number, name in loc.months[context][width].items():
                for variant in (name, name.rstrip(".")):
                    names.setdefault(variant.casefold(), number)
    # English names are understood everywhere: legacy UIs often ignore the locale for month names.
    if loc.language != "en":
        for name, number in _month_names("en"):
            names.setdefault(name, number)
    return tuple(sorted(names.items(), key=lambda item: -len(item[0])))


# strptime's own patterns for the numeric directives (CPython's _strptime), so the shortcut below
# accepts exactly what strptime accepts.
_NUMERIC = {
    "d": r"(?P<d>3[0-1]|[1-2]\d|0[1-9]|[1-9]| [1-9])",
    "m": r"(?P<m>1[0-2]|0[1-9]|[1-9])",
    "Y": r"(?P<Y>\d\d\d\d)",
    "y": r"(?P<y>\d\d)",
    "H": r"(?P<H>2[0-3]|[0-1]\d|\d)",
    "M": r"(?P<M>[0-5]\d|\d)",
    "S": r"(?P<S>6[0-1]|[0-5]\d|\d)",
}
_DIRECTIVE = re.compile(r"%(.)|(\s+)|([^%\s]+)", re.DOTALL)
_FORMAT = re.compile(r"(?:%.|\s+|[^%\s]+)*", re.DOTALL)  # no stray '%' at the end


def _strptime(fmt: str) -> Callable[[str], dt.datetime]:
    """`datetime.strptime(text, fmt)`, several times faster for all-numeric formats such as '%d-%m-%Y'.

    strptime goes through its locale-aware machinery on every call; a date column calls it once per
    row. For formats of day, month, year, hour, minute and second only, one compiled regex does
    the same; anything else, and any text it refuses, goes to strptime itself, which then gives the
    result or its usual error.
    """
    def slow(text: str) -> dt.datetime:
        return dt.datetime.strptime(text, fmt)

    if not _FORMAT.fullmatch(fmt) or ("%y" in fmt and "%Y" in fmt):
        return slow
    parts: list[str] = []
    for directive, space, literal in _DIRECTIVE.findall(fmt):
        if directive:
            if directive == "%":
                parts.append("%")
            elif directive in _NUMERIC and f"(?P<{directive}>" not in "".join(parts):
                parts.append(_NUMERIC[directive])
            else:
                return slow
        else:
            parts.append(r"\s+" if space else re.escape(literal))
    pattern = re.compile("".join(parts), re.IGNORECASE)

    def read(text: str) -> dt.datetime:
        found = pattern.match(text)  # match and a length check, not fullmatch: strptime's own test
        if found is not None and found.end() == len(text):
            got = found.groupdict()
            year = int(got["Y"]) if "Y" in got else 1900
            if "y" in got:
                year = int(got["y"]) + (2000 if int(got["y"]) <= 68 else 1900)
            try:
                return dt.datetime(
                    year, int(got.get("m", 1)), int(got.get("d", 1)),
                    int(got.get("H", 0)), int(got.get("M", 0)), int(got.get("S", 0)),
                )
            except ValueError:
                pass
        return slow(text)

    return read


def _format_reader(fmt: str, locale: str) -> Callable[[str], dt.datetime]:
    if "%b" not in fmt and "%B" not in fmt:
        strptime = _strptime(fmt)
        return lambda text: strptime(" ".join(text.split()))
    # strptime knows only the C locale's month names: swap the locale's name for its number first.
    numeric = fmt.replace("%B", "%m").replace("%b", "%m")
    strptime = _strptime(numeric)
    names = _month_names(locale)
    pattern = re.compile("|".join(re.escape(n) for n, _ in names), re.IGNORECASE)
    lookup = dict(names)

    def read(text: str) -> dt.datetime:
        clean = " ".join(text.split())
        found = pattern.search(clean)
        if found is None:
            raise ValueError(f"no month name of locale {locale!r}")
        month = lookup[found.group(0).casefold()]
        head, tail = clean[: found.start()], clean[found.end() :]
        # An abbreviation's dot ('nov.') may or may not be matched with the name, and may or may not
        # be written in the format: try the number with and without it.
        candidates = (f"{head}{month:02d}{tail}", f"{head}{month:02d}.{tail}", f"{head}{month:02d}{tail[1:]}")
        for candidate in candidates if tail.startswith(".") else candidates[:2]:
            try:
                return strptime(candidate)
            except ValueError:
                continue
        raise ValueError(f"does not match format {fmt!r}")

    return read


def _date_reader(spec: ParseSpec) -> Callable[[str], dt.datetime]:
    formats = spec.formats
    if not formats:
        return lambda text: dt.datetime.fromisoformat(text.strip())
    readers = [_format_reader(fmt, spec.locale) for fmt in formats]
    if len(readers) == 1:
        return readers[0]

    def read(text: str) -> dt.datetime:
        for reader in readers[:-1]:
            try:
                return reader(text)
            except ValueError:
                continue
        return readers[-1](text)

    return read


def _language(locale: str) -> str:
    return _locale(locale).language


@cache
def _dateparser() -> Any:
    import dateparser  # a second to import its language data: only sources that read relative dates pay

    return dateparser


def relative_reader(spec: ParseSpec, zone: ZoneInfo) -> Callable[[str, dt.datetime], dt.datetime]:
    """'5 minutes ago', 'yesterday', 'vor 3 Tagen' -> a naive time in `zone`, counted back from `fetched`.

    Only dateparser's relative-time parser runs: an absolute date it would guess at ('01/02/23')
    stays unread, so the configured formats alone decide what such a text means.
    """
    languages = list(dict.fromkeys([_language(spec.locale), "en"]))

    def read(text: str, fetched: dt.datetime) -> dt.datetime:
        base = fetched.astimezone(zone).replace(tzinfo=None)
        settings = {"RELATIVE_BASE": base, "PARSERS": ["relative-time"], "RETURN_AS_TIMEZONE_AWARE": False,
                    "PREFER_DATES_FROM": "past"}
        found = _dateparser().parse(" ".join(text.split()), languages=languages, settings=settings)
        if not isinstance(found, dt.datetime):
            raise ValueError("not a relative date")
        return found

    return read


def _failure(text: str, kind: str, spec: ParseSpec, exc: Exception) -> ValueError:
    return ValueError(f"cannot read {text!r} as a {kind} ({spec.describe()}): {exc}")


def date_parser(spec: ParseSpec) -> Callable[[str], dt.date]:
    read = _date_reader(spec)

    def parse(text: str) -> dt.date:
        try:
            return read(text).date()
        except ValueError as exc:
            raise _failure(text, "date", spec, exc) from None

    return parse


def datetime_parser(spec: ParseSpec) -> Callable[[str], dt.datetime]:
    read = _date_reader(spec)

    def parse(text: str) -> dt.datetime:
        try:
            return read(text)  # naive: the mapper reads it in the source's time zone
        except ValueError as exc:
            raise _failure(text, "datetime", spec, exc) from None

    return parse


def boolean_parser(spec: ParseSpec) -> Callable[[str], bool]:
    true = _TRUE | {w.casefold() for w in spec.true}
    false = (_FALSE - true) | {w.casefold() for w in spec.false}

    def parse(text: str) -> bool:
        word = text.strip().casefold()
        if word in false:
            return False
        if word in true:
            return True
        raise ValueError(f"cannot read {text!r} as a boolean; add the word to `true:` or `false:`")

    return parse


def parser(spec: ParseSpec | None) -> Parser:
    if spec is None:
        return str
    match spec.type:
        case ParseType.TEXT:
            return str
        case ParseType.INTEGER:
            return integer_parser(spec)
        case ParseType.DECIMAL | ParseType.CURRENCY:
            return number_parser(spec)
        case ParseType.DATE:
            return date_parser(spec)
        case ParseType.DATETIME:
            return datetime_parser(spec)
        case ParseType.BOOLEAN:
            return boolean_parser(spec)
