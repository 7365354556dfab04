"""Field types that every part of the configuration shares: names, durations, zones, encodings.

Each is an annotated type with its own validator and error text, so a source
model only declares `name: Name` or `timezone: TimeZone` and gets the same
check and the same message as every other model.
"""

from __future__ import annotations

import codecs
import difflib
import functools
import ipaddress
import math
import re
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qsl, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema
from pydantic_core import PydanticCustomError

from bus.names import NATS_SCHEMES, RABBITMQ_SCHEMES, REDIS_SCHEMES

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_BRACES = re.compile(r"[^{}]*(?:\{[^{}]*\}[^{}]*)*")  # pairs in order, none nested


class Strict(BaseModel):
    """Unknown keys are errors: a typo must not silently fall back to a default."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def parse_duration(value: Any) -> Any:
    """Accept `5`, `2.5`, `"500ms"`, `"5s"`, `"2m"`, `"1h"`; return seconds."""
    if isinstance(value, bool):  # YAML reads yes/no/on/off as booleans: not a duration
        raise PydanticCustomError(
            "duration", "not a duration: '{value}'; write seconds (5), or a number with ms, s, m or h ('500ms')",
            {"value": "yes" if value else "no"},
        )
    if isinstance(value, (int, float)):
        return _bounded_seconds(value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return _bounded_seconds(float(match.group(1)) * _UNIT_SECONDS[match.group(2)])
        raise PydanticCustomError(
            "duration",
            "not a duration: '{value}'; write seconds (5), or a number with ms, s, m or h ('500ms', '2m')",
            {"value": value},
        )
    return value


MAX_SECONDS = 30 * 86400.0  # longer is a typo; and infinity would break sleeps and statement timeouts


def _bounded_seconds(value: float) -> float:
    # Compared before float(): an int beyond float range would overflow.
    if value < 0:
        raise PydanticCustomError(
            "duration", "a duration cannot be negative; got '{value}'", {"value": str(value)[:40]}
        )
    if (isinstance(value, float) and not math.isfinite(value)) or value > MAX_SECONDS:
        raise PydanticCustomError(
            "duration", "a duration of at most 30 days ('720h'); got '{value}'", {"value": str(value)[:40]}
        )
    return float(value)


def _plain_name(value: str) -> str:
    if not _NAME.match(value):
        raise PydanticCustomError("name", "use letters, digits, '_', '.', '-' (got '{value}')", {"value": value})
    return value


def _stream_name(value: str) -> str:
    """A plain name, or one with a single Redis Cluster hash tag (`erp.{orders}`, `{erp}.orders`).

    Redis hashes a key on the text between its first `{` and the `}` after it, when
    that text is not empty, so `erp.{orders}` shares a slot with the user's other
    `{orders}` keys; the checkpoint key reuses the tag. Anything Redis would read
    differently from how it looks (an empty tag, a second tag it ignores, a stray
    brace) is refused rather than silently hashed on the whole name.
    """
    if "{" not in value and "}" not in value:
        return _plain_name(value)
    if not _BRACES.fullmatch(value):
        problem = "unbalanced or nested braces in '{value}'; a stream name may hold one Redis Cluster hash tag"
    elif value.count("{") > 1:
        problem = "more than one hash tag in '{value}' (Redis hashes on the first only); keep one"
    elif "{}" in value:
        problem = "empty hash tag in '{value}' (Redis would hash the whole name); put the shared part in it"
    elif not _NAME.match(value.replace("{", "").replace("}", "")):
        problem = "'{value}': use letters, digits, '_', '.', '-' and at most one Redis Cluster hash tag"
    else:
        return value
    raise PydanticCustomError("name", problem + ", e.g. 'erp.{orders}'", {"value": value})


def _known_zone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        close = _close_zone(value)
        hint = f"did you mean '{close}'?" if close else "use an IANA name such as 'Europe/Amsterdam'"
        raise PydanticCustomError(
            "timezone", "unknown time zone '{value}'; {hint}", {"value": value, "hint": hint}
        ) from None
    return value


@functools.cache
def _zones() -> dict[str, str]:
    return {zone.lower(): zone for zone in available_timezones()}


def _close_zone(value: str) -> str | None:
    """Zone names are case-sensitive on Linux ('utc' fails): the right spelling, or the nearest name."""
    zones = _zones()
    exact = zones.get(value.strip().lower())
    if exact:
        return exact
    close = difflib.get_close_matches(value.strip().lower(), list(zones), n=1, cutoff=0.8)
    return zones[close[0]] if close else None


def _known_encoding(value: str) -> str:
    try:
        codecs.lookup(value)
    except LookupError:
        raise PydanticCustomError(
            "encoding", "unknown encoding '{value}'; use a Python codec name such as 'cp1252' or 'latin-1'",
            {"value": value},
        ) from None
    return value


# In the JSON Schema a duration is what the file may hold (a number or "5s"), not the float it becomes.
_DURATION_SCHEMA = {
    "anyOf": [
        {"type": "number", "minimum": 0, "maximum": MAX_SECONDS},
        {"type": "string", "pattern": _DURATION.pattern},
    ],
    "examples": ["5s", "500ms", "2m", "1h", 30],
}
Seconds = Annotated[float, BeforeValidator(parse_duration), Field(ge=0), WithJsonSchema(_DURATION_SCHEMA)]
Name = Annotated[str, AfterValidator(_plain_name)]  # source and instance names
StreamName = Annotated[str, AfterValidator(_stream_name)]  # a Name, or one with a Redis Cluster hash tag
TimeZone = Annotated[str, AfterValidator(_known_zone)]  # an IANA zone name
Encoding = Annotated[str, AfterValidator(_known_encoding)]  # a Python codec name


_REDIS_SCHEMES = REDIS_SCHEMES


def _redis_url(value: str) -> str:
    """A URL redis-py reads as written: it silently takes db 0 for `/seven` and localhost for a missing host."""
    example = "e.g. redis://127.0.0.1:6379/0 (rediss:// for TLS, unix:///path/redis.sock)"
    if not value.strip():
        raise PydanticCustomError("redis_url", "empty; write the Redis URL, " + example)
    parts = urlsplit(value)
    if "://" not in value:
        raise PydanticCustomError("redis_url", "no scheme; start it with redis://, " + example)
    if parts.scheme.lower() not in _REDIS_SCHEMES:
        raise PydanticCustomError(
            "redis_url", "'{scheme}://' is not a Redis URL scheme; write redis://, rediss:// or unix://, " + example,
            {"scheme": parts.scheme},
        )
    try:
        port = parts.port
    except ValueError:
        raise PydanticCustomError("redis_url", "the port is not a number from 1 to 65535; " + example) from None
    if port == 0:
        raise PydanticCustomError("redis_url", "the port is not a number from 1 to 65535; " + example)
    if parts.scheme.lower() == "unix":
        return value
    if not parts.hostname:
        raise PydanticCustomError("redis_url", "no host; " + example)
    database = parts.path.strip("/")
    if database and not database.isdigit():
        # Not echoed: in a URL misread around an unencoded '/' in the password, this part holds some of it.
        raise PydanticCustomError("redis_url", "the database after the host is not a number; write /0, /1 …")
    _redis_options(parts.query)
    return value


# The query options of a Redis URL that redis-py understands (it passes any other name on to the
# connection, which fails only at connect time); the TLS files are for `rediss://` with a private CA.
_REDIS_OPTIONS = {
    "db", "socket_timeout", "socket_connect_timeout", "socket_keepalive", "health_check_interval",
    "client_name", "protocol", "ssl_cert_reqs", "ssl_check_hostname", "ssl_min_version",
}
_REDIS_FILE_OPTIONS = {"ssl_ca_certs", "ssl_ca_path", "ssl_certfile", "ssl_keyfile"}


def _redis_options(query: str) -> None:
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name in _REDIS_FILE_OPTIONS:
            path = Path(value)
            if not path.is_absolute():
                raise PydanticCustomError(
                    "redis_url", "{name}={value}: write an absolute path, or {config_dir}/{value} for one "
                    "beside this file", {"name": name, "value": value, "config_dir": "${CONFIG_DIR}"},
                )
            if not path.exists():
                raise PydanticCustomError(
                    "redis_url", "{name}: {value} does not exist; fix the path", {"name": name, "value": value}
                )
        elif name not in _REDIS_OPTIONS:
            known = sorted(_REDIS_OPTIONS | _REDIS_FILE_OPTIONS)
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean '{close[0]}'?" if close else "known: " + ", ".join(known)
            if "password" in name:
                hint = "a key file's password cannot go in the URL: use a key file without one, owner-only (0600)"
            raise PydanticCustomError(
                "redis_url", "unknown option '{name}' in the URL's query; {hint}", {"name": name[:40], "hint": hint}
            )


RedisUrl = Annotated[str, AfterValidator(_redis_url)]  # redis://, rediss:// or unix://, checked part by part

# The other buses' schemes; each bus module checks the rest of its URL when it connects.
_OTHER_BUS_SCHEMES = NATS_SCHEMES + RABBITMQ_SCHEMES


def _bus_url(value: str) -> str:
    """`bus.url`: the scheme picks the bus; a Redis URL is checked as `redis.url` is."""
    scheme = urlsplit(value).scheme.lower() if "://" in value else ""
    if scheme in _REDIS_SCHEMES or not scheme:
        return _redis_url(value)
    if scheme not in _OTHER_BUS_SCHEMES:
        raise PydanticCustomError(
            "bus_url", "'{scheme}://' names no bus straw speaks; write redis:// (or rediss://, unix://), "
            "nats:// (or tls://) for NATS JetStream, rabbitmq-stream:// (or rabbitmq-stream+tls://) for RabbitMQ",
            {"scheme": scheme},
        )
    try:
        port = urlsplit(value).port
    except ValueError:
        port = 0
    if port == 0:
        raise PydanticCustomError("bus_url", "the port is not a number from 1 to 65535")
    if not urlsplit(value).hostname:
        raise PydanticCustomError("bus_url", "no host; e.g. nats://127.0.0.1:4222 or rabbitmq-stream://127.0.0.1:5552")
    return value


BusUrl = Annotated[str, AfterValidator(_bus_url)]  # the scheme picks the bus


_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def _listen_host(value: str) -> str:
    """An IP address or a host name (RFC 1123 labels): checked at load, not when the port is opened."""
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    labels = value.rstrip(".").split(".")
    if len(value) > 253 or all(label.isdigit() for label in labels) or not all(map(_HOST_LABEL.match, labels)):
        raise PydanticCustomError(
            "host", "'{value}' is not an IP address or host name; write e.g. 127.0.0.1, 0.0.0.0 (all) or ::1",
            {"value": value},
        )
    return value


ListenHost = Annotated[str, AfterValidator(_listen_host)]  # where a server listens: an address or a host name
