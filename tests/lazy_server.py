"""A private server for one xdist worker, started the first time a test finds the machine's server gone."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol


class Server(Protocol):
    @property
    def url(self) -> str: ...
    def stop(self) -> None: ...


def lazy_server(start: Callable[[], Server]) -> Iterator[Callable[[], str]]:
    """For a session fixture: yields `url()`, which starts the server at its first call; stops it at the end."""
    started: list[Server] = []

    def url() -> str:
        if not started:
            started.append(start())
        return started[0].url

    yield url
    for server in started:
        server.stop()
