"""The HTTP side of `straw run` on the metrics port: /healthz, /readyz, /metrics, /status.json and `/`.

A plain WSGI app on the standard library's threaded server (what prometheus_client's
own endpoint uses too), so the page needs no framework and no build step. Every
answer is read afresh: the status from the outbox (WAL lets it read beside the
writers), the stream lengths and readiness from Redis with a short timeout.
"""

from __future__ import annotations

import socket
import sqlite3
import threading
from collections.abc import Iterable
from contextlib import closing
from dataclasses import dataclass
from enum import StrEnum
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import orjson
from prometheus_client import make_wsgi_app

from outbox.store import Outbox, OutboxError
from straw.bus_reach import with_bus
from straw.config import Config
from straw.status_page import render_page
from straw.status_report import SourceFilter, SourceOrder, status_document

E = TypeVar("E", bound=StrEnum)

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

    from straw.metrics import Metrics

# The page and /readyz must answer while Redis hangs: a scraper's timeout is a few seconds.
REDIS_TIMEOUT = 1.0


class LeaseView(Protocol):
    """Who holds each source's lease (the multi-host half of "one poller per source")."""

    def holders(self) -> dict[str, str] | None:
        """Source name -> node id of the holder; None while the lease state is not known yet."""
        ...

    def describe(self) -> str:
        """One line for /readyz: the lease configuration and its state."""
        ...


class NoLease:
    """No lease configured: this instance polls every source itself."""

    def holders(self) -> dict[str, str] | None:
        return {}

    def describe(self) -> str:
        return "no lease configured"


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def readiness(config: Config, lease: LeaseView) -> list[Check]:
    """Config loaded (it is, or we would not serve), outbox open, Redis reachable, lease state known."""
    checks = [Check("config", True, "loaded")]
    try:
        uri = config.outbox.path.resolve().as_uri() + "?mode=ro"
        with closing(sqlite3.connect(uri, uri=True, timeout=2.0)) as db:
            db.execute("SELECT count(*) FROM meta").fetchone()
        checks.append(Check("outbox", True, str(config.outbox.path)))
    except sqlite3.Error as exc:
        checks.append(Check("outbox", False, f"{config.outbox.path}: {exc}"))
    pong = with_bus(config, lambda bus: bus.describe() is not None, timeout=REDIS_TIMEOUT)
    checks.append(Check("redis", pong is True, "reachable" if pong is True else f"redis {pong}"))
    known = lease.holders() is not None
    checks.append(Check("lease", known, lease.describe() if known else f"{lease.describe()}: state not known yet"))
    return checks


def make_app(config: Config, metrics: Metrics, lease: LeaseView | None = None) -> WSGIApplication:
    lease_view: LeaseView = lease or NoLease()
    prometheus = make_wsgi_app(metrics.registry)

    def status(only: SourceFilter | None = None, order: SourceOrder = SourceOrder.STATE) -> dict[str, Any]:
        outbox = Outbox(config.outbox.path)
        try:
            lengths = with_bus(config, lambda bus: {s: bus.length(s) for s in config.streams}, REDIS_TIMEOUT)
            document = status_document(config, outbox, only=only, order=order, lengths=lengths)
        finally:
            outbox.close()
        holders = lease_view.holders() or {}
        for row in document["sources"]:
            row["lease"] = holders.get(row["source"])
        for row in document["streams"]:
            row["published_last_hour"] = metrics.history.last_hour(row["stream"])
        return {"instance": config.instance, **document}

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            scrape: Iterable[bytes] = prometheus(environ, start_response)
            return scrape
        if path == "/healthz":
            return _send(start_response, "200 OK", "text/plain; charset=utf-8", b"ok\n")
        if path == "/readyz":
            checks = readiness(config, lease_view)
            ready = all(c.ok for c in checks)
            body = orjson.dumps({"ready": ready, "checks": [c.__dict__ for c in checks]}, option=orjson.OPT_INDENT_2)
            return _send(start_response, "200 OK" if ready else "503 Service Unavailable", "application/json", body)
        if path in ("/status.json", "/"):
            # ?state=error|new|ok and ?sort=state|name|last-poll, as `straw status --state/--sort`: with
            # hundreds of sources the page lists what is asked for; anything else is the default, not an error.
            query = parse_qs(environ.get("QUERY_STRING", ""))
            only = _choice(SourceFilter, query.get("state"))
            order = _choice(SourceOrder, query.get("sort")) or SourceOrder.STATE
            try:
                document = status(only, order)
            except OutboxError as exc:
                return _send(start_response, "503 Service Unavailable", "text/plain; charset=utf-8",
                             f"{exc}\n".encode())
            if path == "/":
                return _send(start_response, "200 OK", "text/html; charset=utf-8", render_page(document).encode())
            return _send(start_response, "200 OK", "application/json", orjson.dumps(document))
        return _send(start_response, "404 Not Found", "text/plain; charset=utf-8",
                     b"not found; try /, /status.json, /metrics, /healthz or /readyz\n")

    return app


def _choice(kind: type[E], given: list[str] | None) -> E | None:
    """The member of `kind` a query parameter names (its first value), or None."""
    try:
        return kind(given[0]) if given else None
    except ValueError:
        return None


def _send(start_response: StartResponse, status: str, kind: str, body: bytes) -> list[bytes]:
    start_response(status, [("Content-Type", kind), ("Content-Length", str(len(body))),
                            ("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff")])
    return [body]


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow client must not hold the run's exit


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds are not news for the log."""


def serve(host: str, port: int, app: WSGIApplication) -> tuple[WSGIServer, threading.Thread]:
    """Listen on host:port (IPv4 or IPv6) and serve `app` from a daemon thread; OSError if it cannot bind."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    server_class: type[_ThreadingServer] = type("Server", (_ThreadingServer,), {"address_family": family})
    server = make_server(host, port, app, server_class, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="straw-http", daemon=True)
    thread.start()
    return server, thread
