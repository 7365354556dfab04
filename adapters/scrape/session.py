"""The session file: one format for both modes, Playwright's storage state.

`{"cookies": [{"name", "value", "domain", "path", "expires", "httpOnly", "secure", "sameSite"}],
"origins": [...]}`: static mode reads and writes its cookies, browser mode the whole state (local
storage too). A file that cannot be read, is not such a state, or holds only expired cookies is
ignored with a warning naming it: the run then logs in afresh and overwrites it.
"""

from __future__ import annotations

import time
from http.cookiejar import CookieJar
from pathlib import Path
from typing import Any

import orjson
import structlog

from adapters.scrape.fetch import write_private

_COOKIE_KEYS = ("name", "value", "domain", "path")


def log() -> Any:
    return structlog.get_logger("straw.scrape")


def load(path: Path | None, source: str) -> dict[str, Any] | None:
    """The saved state, its expired cookies dropped; None (after a warning) when there is none to use."""
    if path is None or not path.exists():
        return None
    try:
        state = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        why = f"cannot read it ({type(exc).__name__}: {exc})"
    else:
        if not _is_state(state):
            why = "not a session file straw wrote (expected Playwright storage state)"
        else:
            cookies = [c for c in state["cookies"] if not _expired(c)]
            if cookies or not state["cookies"]:
                return {"cookies": cookies, "origins": state.get("origins") or []}
            why = "every cookie in it has expired"
    log().warning("session file ignored; logging in afresh", source=source, session_file=str(path), reason=why)
    return None


def _expired(cookie: dict[str, Any]) -> bool:
    expires = cookie.get("expires")
    return isinstance(expires, int | float) and 0 < expires < time.time()


def _is_state(state: Any) -> bool:
    return (
        isinstance(state, dict)
        and isinstance(state.get("cookies"), list)
        and isinstance(state.get("origins", []), list)
        and all(isinstance(c, dict) and all(isinstance(c.get(k), str) for k in _COOKIE_KEYS) for c in state["cookies"])
    )


def from_jar(jar: CookieJar) -> dict[str, Any]:
    """Static mode's cookies as a storage state browser mode can load."""
    return {
        "cookies": [
            {
                "name": c.name,
                "value": c.value or "",
                "domain": c.domain,
                "path": c.path,
                "expires": c.expires if c.expires is not None else -1,
                "httpOnly": bool(c.has_nonstandard_attr("HttpOnly") or c.has_nonstandard_attr("httponly")),
                "secure": c.secure,
                "sameSite": "Lax",
            }
            for c in jar
        ],
        "origins": [],
    }


def save(path: Path | None, state: dict[str, Any]) -> None:
    if path is not None:
        write_private(path, orjson.dumps(state))
