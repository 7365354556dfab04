"""Keep secrets out of logs, errors and the stream.

Secrets only are registered here (see config_load: URL passwords, `${file:…}`
values, values under secret keys or from secret-named variables); `redact`
replaces each registered value in any text and masks the password part of URLs.
Hosts, ports, database and user names stay readable, so errors stay useful.
"""

from __future__ import annotations

import re
from collections.abc import MutableMapping
from typing import Any

_MASK = "***"
_MIN_SECRET_LEN = 4  # shorter values ("1", "on") would mask ordinary words
_secrets: set[str] = set()
# A password in a URL ends at the first `@` and holds no `?` or `#`: an `@` in a query string
# (`?owner=alice@example.com`) ends no password. A `/` may be in one written unescaped: still masked.
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/?#@\s]*):(?P<pw>[^@?#\s]+)@", re.I)


def register_secret(value: str) -> None:
    if len(value) >= _MIN_SECRET_LEN:
        _secrets.add(value)


def redact(text: str) -> str:
    for secret in sorted(_secrets, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, _MASK)
    return _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{_MASK}@", text)


def redact_event(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: redact every string value of a log event."""
    for key, value in event.items():
        if isinstance(value, str):
            event[key] = redact(value)
        elif isinstance(value, BaseException):
            event[key] = redact(f"{type(value).__name__}: {value}")
    return event


def registered_secrets() -> list[str]:
    """For a child process, which must redact the same values."""
    return sorted(_secrets)


def describe(exc: BaseException) -> str:
    """An error as one redacted line: the driver's own message when SQLAlchemy wraps one
    (without its SQL and "background" footer)."""
    inner = getattr(exc, "orig", None)
    shown = inner if isinstance(inner, BaseException) else exc
    return redact(f"{type(shown).__name__}: " + " ".join(str(shown).split()))
