"""Scrape sources on one web server share its connection pool and its request rate.

A legacy intranet server is usually one small machine: ten sources reading ten lists of it
must not open ten times the connections, nor send ten times the rate, that one source is
allowed. Sources whose `base_url` has the same origin (and the same TLS settings) share one
connection pool, sized by the smallest `http.concurrency` among them, and one rate limit, the
smallest `http.rate_limit` among them (browser-mode sources share the rate limit too).
Cookies, headers and credentials stay each source's own (two sources may log in as two users).

Sources register when they are built; the pool is made at the first request, when every
source of the configuration has said what it allows.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

from adapters.scrape.fetch import RateLimit

HostKey = tuple[str, str, str]


@dataclass
class Host:
    key: HostKey
    concurrency: list[int] = field(default_factory=list)  # one entry per static source
    rates: list[float | None] = field(default_factory=list)
    users: int = 0
    limit: RateLimit | None = None
    pool: TlsWhenNeeded | None = None
    slots: threading.BoundedSemaphore | None = None  # requests in flight on the pool: never more than it holds

    @property
    def connections(self) -> int:
        return min(self.concurrency, default=4)

    def rate(self) -> RateLimit:
        if self.limit is not None:  # asked before every request: no lock once made
            return self.limit
        with _lock:
            if self.limit is None:
                given = [r for r in self.rates if r]
                self.limit = RateLimit(min(given) if given else None)
            return self.limit

    def transport(self, verify: bool | ssl.SSLContext) -> httpx.BaseTransport:
        with _lock:
            if self.pool is None:
                limits = httpx.Limits(max_connections=self.connections, max_keepalive_connections=self.connections)
                self.pool = TlsWhenNeeded(verify, limits)
                self.slots = threading.BoundedSemaphore(self.connections)
            assert self.slots is not None
            return _Borrowed(self.pool, self.slots)


_lock = threading.Lock()
_hosts: dict[HostKey, Host] = {}


def key_of(base_url: str, verify: Any) -> HostKey:
    parts = urlsplit(base_url)
    return parts.scheme.lower(), parts.netloc.lower(), repr(verify)


def register(base_url: str, verify: Any, concurrency: int | None, rate_limit: float | None) -> Host:
    """`concurrency` None: a browser source, which shares the rate limit but not the pool."""
    key = key_of(base_url, verify)
    with _lock:
        host = _hosts.setdefault(key, Host(key))
        if concurrency is not None:
            host.concurrency.append(concurrency)
        host.rates.append(rate_limit)
        host.users += 1
        return host


def release(host: Host) -> None:
    with _lock:
        host.users -= 1
        if host.users > 0:
            return
        _hosts.pop(host.key, None)
        pool, host.pool = host.pool, None
    if pool is not None:
        pool.close()


class _Borrowed(httpx.BaseTransport):
    """The shared pool as one client sees it: closing the client leaves the pool to the others.

    Sources sharing a pool run more threads than it has connections. A request never waits inside the pool:
    it first takes one of the host's slots (as many as connections), held until its response is closed.
    httpcore's sync pool can close a connection it has just handed to a queued request, which then hangs
    until its read timeout (encode/httpcore#1110; seen here as a 20 s ReadTimeout on a loopback server).
    """

    def __init__(self, shared: httpx.BaseTransport, slots: threading.BoundedSemaphore) -> None:
        self._shared = shared
        self._slots = slots

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout") or {}
        wait = timeouts.get("pool")
        if not self._slots.acquire(timeout=wait):
            raise httpx.PoolTimeout(f"no free connection to {request.url.host} within {wait} s", request=request)
        try:
            response = self._shared.handle_request(request)
        except BaseException:
            self._slots.release()
            raise
        response.stream = _ReleasedOnClose(response.stream, self._slots)
        return response

    def close(self) -> None:
        pass  # closed by release(), when the host's last source is closed


class _ReleasedOnClose(httpx.SyncByteStream):
    """A response body that gives its slot back when closed (httpx closes it once read, or on an error)."""

    def __init__(self, stream: httpx.SyncByteStream | httpx.AsyncByteStream, slots: threading.BoundedSemaphore) -> None:
        self._stream = stream
        self._slots: threading.BoundedSemaphore | None = slots

    def __iter__(self) -> Iterator[bytes]:
        assert isinstance(self._stream, httpx.SyncByteStream)
        yield from self._stream

    def close(self) -> None:
        try:
            if isinstance(self._stream, httpx.SyncByteStream):
                self._stream.close()
        finally:
            slots, self._slots = self._slots, None
            if slots is not None:
                slots.release()


class TlsWhenNeeded(httpx.BaseTransport):
    """http:// on one connection pool; https:// on another, made at the first https:// request.

    A verifying TLS context loads the whole CA bundle (~16 ms, as long as a hundred page fetches);
    an intranet UI on plain HTTP never needs it.
    """

    def __init__(self, verify: bool | ssl.SSLContext, limits: httpx.Limits) -> None:
        self._verify = verify
        self._limits = limits
        self._plain = httpx.HTTPTransport(verify=False, limits=limits)  # no certificates to load
        self._tls: httpx.HTTPTransport | None = None
        self._lock = threading.Lock()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.scheme != "https":
            return self._plain.handle_request(request)
        with self._lock:
            if self._tls is None:
                self._tls = httpx.HTTPTransport(verify=self._verify, limits=self._limits)
        return self._tls.handle_request(request)

    def close(self) -> None:
        self._plain.close()
        if self._tls is not None:
            self._tls.close()
