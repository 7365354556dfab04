"""A loader ahead of its bus: after a failover the bus may have lost records the loader already applied.

The loader's target holds the last applied `seq` per stream (`straw_applied`); the bus's newest record says
where the stream stands now. When the target is ahead, the bus rolled back (a Redis replica promoted before
it had the last writes, a restore from a snapshot): the publisher's repair will re-publish the lost range
with the same `seq`s. Until it has, the loader logs an error with both figures, shows it in its tally
(`straw load` prints it) and polls; it reads nothing meanwhile, so it neither applies a record it has
passed nor skips one the repair brings back (those it has applied are skipped by `seq`, as always).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import structlog

from bus.seam import Bus
from loaders.consumer import Consumer

log = structlog.get_logger("straw.loader")


RECENT = 100  # entries looked at for a stream's newest seq: those `straw dlq retry` appended carry old seqs


def newest_seq(bus: Bus, stream: str) -> int:
    """The seq of the stream's newest record (0: none), seen from the bus side (`straw status`, the metrics):
    the highest of the newest entries, since an entry `straw dlq retry` sent back carries its old seq."""
    return max((published.seq for published in bus.newest(stream, RECENT)), default=0)


class StreamBehind(Exception):
    """`--once` waited `give_up_after` for a repair that did not come: the operator's one line."""


def behind(consumer: Consumer, applied: Callable[[str], int], streams: Sequence[str]) -> dict[str, tuple[int, int]]:
    """Streams whose newest record on the bus is below the target's applied seq: stream -> (applied, newest)."""
    found = {}
    for stream in streams:
        done = applied(stream)
        if done:
            newest = consumer.newest_seq(stream)
            if newest < done:
                found[stream] = (done, newest)
    return found


def wait_for_repair(
    consumer: Consumer,
    applied: Callable[[str], int],
    streams: Sequence[str],
    waiting: dict[str, tuple[int, int]],
    stop: threading.Event,
    *,
    poll: float,
    give_up_after: float | None,
) -> None:
    """Return once no stream is behind (or `stop` is set); `waiting` shows what is awaited meanwhile.
    Raises the consumer's `BusDown` (the caller retries) and, with `give_up_after`, `StreamBehind`."""
    began = time.monotonic()
    warned: set[str] = set()
    while not stop.is_set():
        now_behind = behind(consumer, applied, streams)
        for stream, (done, newest) in now_behind.items():
            if stream not in warned:
                warned.add(stream)
                log.error("the bus is behind this loader: waiting for the publisher's repair", stream=stream,
                          applied_seq=done, bus_newest_seq=newest,
                          hint="the bus lost records in a failover (or they aged out); the relay re-publishes "
                               "them with the same seq, and this loader goes on once the stream reaches its seq")
        for stream in set(waiting) - set(now_behind):
            log.info("the bus caught up with this loader", stream=stream, applied_seq=waiting[stream][0])
        waiting.clear()
        waiting.update(now_behind)
        if not now_behind:
            return
        if give_up_after is not None and time.monotonic() - began > give_up_after:
            stream, (done, newest) = next(iter(now_behind.items()))
            raise StreamBehind(f"stream {stream}: this loader applied up to seq {done} but the bus's newest record "
                               f"is seq {newest}; the bus lost records (a failover?): run the publisher "
                               "(`straw run`) so its repair re-publishes them, then load again")
        stop.wait(poll)
