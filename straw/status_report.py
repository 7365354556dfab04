"""What `straw status --json`, `/status.json` and the status page show: one document, built in one place.

The outbox holds each source's position, last poll, counts and last error, and
each stream's published `seq` and relay error; the bus adds the stream lengths.
Errors are redacted here, so no caller can show a secret by forgetting to.
"""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from typing import Any, cast

from bus.connect import bus_name, checkpoint_label
from bus.redis import RedisBus, translated
from bus.seam import Bus
from outbox.store import Outbox, SourceState
from straw.bus_reach import with_bus
from straw.config import Config
from straw.lease import holders
from straw.redact import redact


def _bus_facts(config: Config, bus: Bus, lengths: bool) -> tuple[dict[str, int], dict[str, str | None]]:
    """The streams' lengths (if asked) and, with `lease:`, their lease holders, over one connection."""
    found = {s: bus.length(s) for s in config.streams} if lengths else {}
    if config.lease is None:
        return found, {}
    with translated():  # leases are Redis-only (the config refuses `lease:` elsewhere)
        return found, holders(cast(RedisBus, bus).client, config.streams)


def when(stamp: str | None) -> str:
    """Outbox times are UTC ISO; show them to the second."""
    return stamp[:19].replace("T", " ") + "Z" if stamp else "never"


class SourceFilter(StrEnum):
    ERROR = "error"
    OK = "ok"
    NEW = "new"


class SourceOrder(StrEnum):
    STATE = "state"
    NAME = "name"
    LAST_POLL = "last-poll"


def source_state(state: SourceState | None) -> SourceFilter:
    if state is None or state.polled_at is None:
        return SourceFilter.NEW
    return SourceFilter.ERROR if state.error else SourceFilter.OK


def ordered_sources(
    names: list[str], states: dict[str, SourceState], only: SourceFilter | None, order: SourceOrder
) -> list[str]:
    """The sources to list: errors first (then new, then ok) by default, each group by name."""
    rank = {SourceFilter.ERROR: 0, SourceFilter.NEW: 1, SourceFilter.OK: 2}
    kept = [n for n in names if only is None or source_state(states.get(n)) is only]
    if order is SourceOrder.NAME:
        return sorted(kept)
    if order is SourceOrder.LAST_POLL:  # the longest unpolled first: a stuck source stands out
        return sorted(kept, key=lambda n: ((states[n].polled_at or "") if n in states else "", n))
    return sorted(kept, key=lambda n: (rank[source_state(states.get(n))], n))


def age_seconds(observed: str | None, now: dt.datetime | None = None) -> float | None:
    """Seconds since an event's `time` (RFC 3339, UTC); None when there is none."""
    if not observed:
        return None
    moment = dt.datetime.fromisoformat(observed.replace("Z", "+00:00"))
    return max(0.0, ((now or dt.datetime.now(dt.UTC)) - moment).total_seconds())


def status_document(
    config: Config,
    outbox: Outbox,
    *,
    only: SourceFilter | None = None,
    order: SourceOrder = SourceOrder.STATE,
    lengths: dict[str, int] | str | None = None,
) -> dict[str, Any]:
    """The status of every configured source and stream. `lengths`: the streams' XLEN, or why Redis could
    not tell (read from Redis when not given)."""
    states = {s.source: s for s in outbox.sources()}
    dead = outbox.dead_letter_counts()
    streams = {s.stream: s for s in outbox.streams()}
    backlog = outbox.backlog()
    names = [s.name for s in config.sources]
    counts = {k.value: sum(1 for n in names if source_state(states.get(n)) is k) for k in SourceFilter}
    sources: list[dict[str, Any]] = []
    for name in ordered_sources(names, states, only, order):
        state = states.get(name)
        sources.append({
            "source": name,
            "state": source_state(state).value,
            "position": state.position if state and state.position else None,
            "last_poll": when(state.polled_at if state else None),
            "read": state.rows_read if state else 0,
            "published": state.rows_published if state else 0,
            "dead_letters": dead.get(name, 0),
            "error": redact(state.error) if state and state.error else None,
        })
    if lengths is None or config.lease is not None:  # one connection for both
        found = with_bus(config, lambda bus: _bus_facts(config, bus, lengths is None))
        if lengths is None:
            lengths = found if isinstance(found, str) else found[0]
        if config.lease is not None:  # active/standby pairs: which node polls each source now (its stream's lease)
            stream_of = {s.name: s.stream for s in config.sources}
            for row in sources:
                row["lease_holder"] = None if isinstance(found, str) else found[1].get(stream_of[row["source"]])
    redis_error = lengths if isinstance(lengths, str) else None
    stream_rows: list[dict[str, Any]] = []
    for name in config.streams:
        known = streams.get(name)
        oldest = outbox.oldest_pending_time(name, known.published_seq) if known and known.backlog else None
        stream_rows.append({
            "stream": name,
            "length": lengths.get(name, 0) if isinstance(lengths, dict) else None,
            "checkpoint": checkpoint_label(config.bus_spec.url, name, config.bus_spec.jetstream_options()),
            "published_seq": known.published_seq if known else 0,
            "backlog": known.backlog if known else 0,
            "oldest_unpublished_age": age_seconds(oldest),
            "retained": {"records": known.retained.records, "first_seq": known.retained.first,
                         "last_seq": known.retained.last} if known else None,
            "rollback": known.rollback.describe() if known and known.rollback else None,
            "last_publish": when(known.published_at if known else None),
            "error": redact(known.error) if known and known.error
            else (f"{bus_name(config.bus_spec.url)} {redis_error}" if redis_error else None),
        })
    return {"sources": sources, "counts": counts, "streams": stream_rows,
            "outbox": {"path": str(config.outbox.path), "backlog": backlog, "bytes": outbox.size()}}
