"""Field types that every part of the configuration shares: names, durations, zones, encodings.

Each is an annotated type with its own validator and error text, so a source
model only declares `name: Name` or `timezone: TimeZone` and gets the same
check and the same message as every other model.
"""

from __future__ import annotations

import codecs
import re
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class Strict(BaseModel):
    """Unknown keys are errors: a typo must not silently fall back to a default."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def parse_duration(value: Any) -> Any:
    """Accept `5`, `2.5`, `"500ms"`, `"5s"`, `"2m"`, `"1h"`; return seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        raise PydanticCustomError(
            "duration",
            "not a duration: '{value}'; write seconds (5), or a number with ms, s, m or h ('500ms', '2m')",
            {"value": value},
        )
    return value


def _plain_name(value: str) -> str:
    if not _NAME.match(value):
        raise PydanticCustomError("name", "use letters, digits, '_', '.', '-' (got '{value}')", {"value": value})
    return value


def _known_zone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise PydanticCustomError(
            "timezone", "unknown time zone '{value}'; use an IANA name such as 'Europe/Amsterdam'", {"value": value}
        ) from None
    return value


def _known_encoding(value: str) -> str:
    try:
        codecs.lookup(value)
    except LookupError:
        raise PydanticCustomError(
            "encoding", "unknown encoding '{value}'; use a Python codec name such as 'cp1252' or 'latin-1'",
            {"value": value},
        ) from None
    return value


Seconds = Annotated[float, BeforeValidator(parse_duration), Field(ge=0)]
Name = Annotated[str, AfterValidator(_plain_name)]  # source, stream and instance names
TimeZone = Annotated[str, AfterValidator(_known_zone)]  # an IANA zone name
Encoding = Annotated[str, AfterValidator(_known_encoding)]  # a Python codec name
