"""Records published per stream and minute over the last hour, for the status page's chart.

Kept in memory by the process that serves the page, fed by the relay's report
of each round: a restart starts an empty chart (the counters since the outbox
was created are in `straw status`). Sixty counters a stream, whatever the rate.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

MINUTES = 60


class PublishHistory:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._lock = threading.Lock()  # the relay listener adds while the page's thread reads
        self._minutes: dict[str, dict[int, int]] = {}

    def add(self, stream: str, records: int) -> None:
        minute = int(self.clock() // 60)
        with self._lock:
            counts = self._minutes.setdefault(stream, {})
            counts[minute] = counts.get(minute, 0) + records
            for old in [m for m in counts if m <= minute - MINUTES]:
                del counts[old]

    def last_hour(self, stream: str) -> list[int]:
        """Records published in each of the last 60 minutes, oldest first; the current minute last."""
        minute = int(self.clock() // 60)
        with self._lock:
            counts = dict(self._minutes.get(stream, {}))
        return [counts.get(m, 0) for m in range(minute - MINUTES + 1, minute + 1)]
