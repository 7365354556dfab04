"""Coercion of legacy values to the canonical field types.

Each function takes a raw driver value and returns the canonical value, ready
for JSON: decimals as exact strings, datetimes aware (naive ones read in the
source's time zone), dates kept apart from datetimes. Errors are `ValueError`
with a message fit for the dead-letter table.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import math
import uuid
from collections.abc import Callable
from decimal import ROUND_HALF_EVEN, Context, Decimal, DecimalException, InvalidOperation
from typing import Any
from zoneinfo import ZoneInfo

from straw.config import FieldSpec, FieldType

Coercer = Callable[[Any], Any]

_TRUE = frozenset({"1", "t", "true", "y", "yes", "on", "j", "ja"})
_FALSE = frozenset({"0", "f", "false", "n", "no", "off", "nee"})
_WORDS = {
    variant: word in _TRUE
    for word in _TRUE | _FALSE
    for variant in (word, word.upper(), word.capitalize())
}


# Digits a decimal may have in its plain ('f') form: 1E+999999 would be a megabyte of zeros in every event.
MAX_DIGITS = 1000


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{text[:80]}… ({type(value).__name__})" if len(text) > 80 else f"{text} ({type(value).__name__})"


class Unreadable:
    """A value a source saw but could not read (a scraped date matching no configured format).

    Every coercer refuses it with the source's own reason, so its row becomes a dead letter that
    says why, instead of being published with a null or with the raw text.
    """

    __slots__ = ("reason", "text")

    def __init__(self, text: str, reason: str) -> None:
        self.text, self.reason = text, reason

    def __repr__(self) -> str:  # what the dead letter's raw row shows for it
        return f"unreadable {self.text!r}"


def _fail(value: Any, kind: str, why: str = "") -> ValueError:
    if isinstance(value, Unreadable):
        return ValueError(value.reason)
    return ValueError(f"cannot read {_describe(value)} as {kind}{': ' + why if why else ''}")


def _decode(value: bytes | bytearray | memoryview, encoding: str) -> str:
    try:
        return bytes(value).decode(encoding)
    except UnicodeDecodeError as exc:
        raise ValueError(f"bytes are not valid {encoding} at offset {exc.start}") from None


def string(encoding: str, trim: bool = False) -> Coercer:
    if trim:
        plain = string(encoding)
        # Only trailing blanks: CHAR(n) pads with them, and leading ones may be meaningful.
        return lambda value: plain(value).rstrip(" ")

    def coerce(value: Any) -> Any:
        if type(value) is str:
            return value
        if isinstance(value, (bytes, bytearray, memoryview)):
            return _decode(value, encoding)
        if isinstance(value, (int, Decimal)) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, float):
            return repr(value)
        if isinstance(value, (dt.date, dt.time)):
            return value.isoformat()
        if isinstance(value, uuid.UUID):  # PostgreSQL's, MariaDB's: the canonical text, as they spell it
            return str(value)
        raise _fail(value, "string")

    return coerce


def integer(value: Any) -> Any:
    if type(value) is int:
        return value
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise _fail(value, "integer", "not a finite number")
        if value.adjusted() >= MAX_DIGITS:
            raise _fail(value, "integer", f"more than {MAX_DIGITS} digits")
        if value == value.to_integral_value():
            return int(value)
        raise _fail(value, "integer", "has a fraction")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _fail(value, "integer", "not a finite number")
        if value.is_integer():
            return int(value)
        raise _fail(value, "integer", "has a fraction")
    if isinstance(value, (str, bytes)):
        try:
            return int(value.strip())
        except ValueError:
            raise _fail(value, "integer") from None
    raise _fail(value, "integer")


def _format_decimal(value: Decimal) -> str:
    # format 'f' never uses exponent notation: '1E+2' would confuse loaders.
    return format(value, "f")


def decimal(scale: int | None) -> Coercer:
    quantum = Decimal(1).scaleb(-scale) if scale is not None else None
    needed = (scale or 0) + 2  # digits of precision beyond the integer part's that quantize needs
    # str is a quarter of format's cost, and a value quantized to 0..6 decimals has the same text in both:
    # str turns to exponent notation only past 6 leading zeros after the point, or for a positive exponent.
    render = str if scale is not None and 0 <= scale <= 6 else _format_decimal

    def coerce(value: Any) -> Any:
        if isinstance(value, Decimal):
            number = value
        elif isinstance(value, int) and not isinstance(value, bool):
            number = Decimal(value)
        elif isinstance(value, float):
            # repr is the shortest text that reads back as the same float: 19.99, not 19.989999…
            number = Decimal(repr(value))
        elif isinstance(value, (str, bytes)):
            text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
            try:
                number = Decimal(text.strip())
            except InvalidOperation:
                raise _fail(value, "decimal") from None
        else:
            raise _fail(value, "decimal")
        if not number.is_finite():
            raise _fail(value, "decimal", "not a finite number")
        # Only the exponent can make the text longer than the value read: 1E+999999, 1E-999999.
        adjusted = number.adjusted()
        if adjusted >= MAX_DIGITS or (quantum is None and adjusted <= -MAX_DIGITS):
            raise _fail(value, "decimal", f"more than {MAX_DIGITS} digits")
        if quantum is not None:
            digits = adjusted + needed
            try:
                if digits <= 28:  # the default context's precision
                    # Positional: _decimal parses a keyword argument at twice the cost of the rounding itself.
                    number = number.quantize(quantum, ROUND_HALF_EVEN)
                else:  # it would refuse NUMERIC(38) values: give quantize the digits it needs
                    number = number.quantize(quantum, ROUND_HALF_EVEN, Context(prec=digits))
            except DecimalException as exc:
                raise _fail(value, "decimal", f"cannot round to scale {scale} ({type(exc).__name__})") from None
            return render(number)
        return _format_decimal(number)

    return coerce


def boolean(value: Any) -> Any:
    if type(value) is str:  # the usual legacy flag ('J', 'N', 'Y', '1'): one lookup
        found = _WORDS.get(value)
        if found is not None:
            return found
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, Decimal)) and value in (0, 1):
        return bool(value)
    if isinstance(value, (str, bytes)):
        text = (value.decode("ascii", "replace") if isinstance(value, bytes) else value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise _fail(value, "boolean")


def date(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        if value.time() == dt.time(0) and value.tzinfo is None:
            return value.date()
        raise _fail(value, "date", "has a time of day; declare the field as datetime")
    if isinstance(value, dt.date):
        return value
    if isinstance(value, str):
        try:
            return dt.date.fromisoformat(value.strip())
        except ValueError:
            raise _fail(value, "date", "expected YYYY-MM-DD") from None
    raise _fail(value, "date")


def datetime(zone: ZoneInfo) -> Coercer:
    combine = dt.datetime.combine
    def coerce(value: Any) -> Any:
        if type(value) is dt.datetime:  # what drivers return: skip the checks below
            # combine, not replace(tzinfo=...): the same datetime (fold kept, as time() keeps it) at a
            # quarter of the cost, which on CPython 3.11 is most of this coercer's.
            return combine(value.date(), value.time(), zone) if value.tzinfo is None else value
        if isinstance(value, dt.datetime):
            moment = value
        elif isinstance(value, dt.date):
            raise _fail(value, "datetime", "a DATE has no time of day; declare the field as date")
        elif isinstance(value, str):
            try:
                moment = dt.datetime.fromisoformat(value.strip())
            except ValueError:
                raise _fail(value, "datetime", "expected ISO 8601") from None
        else:
            raise _fail(value, "datetime")
        return moment.replace(tzinfo=zone) if moment.tzinfo is None else moment

    return coerce


def json_value(value: Any) -> Any:
    if isinstance(value, (str, bytes, bytearray)):
        try:
            # Exact numbers: orjson reads 123456789012345678901234567890 as a float and loses digits.
            return _exact_json(json.loads(value, parse_float=Decimal, parse_constant=_no_constant))
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError and ours
            raise _fail(value, "json", str(exc)) from None
        except RecursionError:
            raise _fail(value, "json", "nested too deeply") from None
    if isinstance(value, Decimal):
        return _format_decimal(value)
    try:
        return _exact_json(value)
    except ValueError as exc:
        raise _fail(value, "json", str(exc)) from None
    except RecursionError:
        raise _fail(value, "json", "nested too deeply") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _exact_json(value: Any) -> Any:
    """The value if JSON carries it exactly; numbers read as Decimal become floats only when exact.

    NaN and ±Infinity would be published as null, a set or a non-text key as some
    string of Python's: a dead letter is better than a wrong value.
    """
    if value is None or isinstance(value, (str, bool, int)):
        if isinstance(value, str):
            value.encode("utf-8")  # a lone surrogate cannot go on the wire
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value!r} has no JSON form")
        return value
    if isinstance(value, Decimal):
        number = float(value)
        if not math.isfinite(number) or Decimal(repr(number)) != value:
            raise ValueError(f"the number {_format_decimal(value)[:40]} does not fit a JSON double exactly")
        return number
    if isinstance(value, list):
        return [_exact_json(v) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise ValueError("an object key is not text")
        return {_exact_json(k): _exact_json(v) for k, v in value.items()}
    raise ValueError(f"a {type(value).__name__} is not JSON")


def binary(encoding: str) -> Coercer:
    """BLOB/BYTEA/VARBINARY as base64 text (standard alphabet, padded): JSON has no bytes."""

    def coerce(value: Any) -> Any:
        if isinstance(value, (bytes, bytearray, memoryview)):
            return base64.b64encode(value).decode("ascii")
        if isinstance(value, str):  # a driver or SQLite handing text back for a binary column
            return base64.b64encode(value.encode(encoding)).decode("ascii")
        raise _fail(value, "bytes")

    return coerce


def unchanged_type(spec: FieldSpec, trim: bool = False) -> type | None:
    """The exact type whose values `coercer(spec, ...)` returns as they are, if any.

    A column of only such values needs no coercer call at all (the mapper checks the types in C).
    """
    return {FieldType.STRING: None if trim else str, FieldType.INTEGER: int, FieldType.DATE: dt.date,
            FieldType.BOOLEAN: bool}.get(spec.type)


def coercer(spec: FieldSpec, zone: ZoneInfo, encoding: str = "utf-8", trim: bool = False) -> Coercer:
    match spec.type:
        case FieldType.STRING:
            return string(encoding, trim)
        case FieldType.BYTES:
            return binary(encoding)
        case FieldType.INTEGER:
            return integer
        case FieldType.DECIMAL:
            return decimal(spec.scale)
        case FieldType.BOOLEAN:
            return boolean
        case FieldType.DATE:
            return date
        case FieldType.DATETIME:
            return datetime(zone)
        case FieldType.JSON:
            return json_value
