"""`straw status` of the loaders: per loader and stream, what the target applied, what the bus holds, the lag,
and the dead letters waiting. Only looks: no lock taken, no file or table created, a torn line not cut."""

from __future__ import annotations

from typing import Any

from sqlalchemy import MetaData, select

from bus.seam import Bus
from loaders.jsonl import last_seq
from loaders.repair import newest_seq
from loaders.sql_schema import bookkeeping
from loaders.target_check import missing_sqlite, target_engine
from straw.bus_reach import with_bus
from straw.config import Config
from straw.config_loaders import AnyLoaderSpec, JsonlLoaderSpec
from straw.redact import describe

BUS_TIMEOUT = 3.0


def loader_status(config: Config) -> list[dict[str, Any]]:
    """One row per loader and stream: applied, newest, lag (None where unknown), dead letters, error."""
    bus_facts = with_bus(config, lambda bus: _bus_facts(bus, config.loaders), BUS_TIMEOUT)
    rows = []
    for spec in config.loaders:
        applied = _applied(spec)
        errors = [applied] if isinstance(applied, str) else []
        if isinstance(bus_facts, str):
            errors.append(f"bus {bus_facts}")
        for stream in spec.streams:
            done = applied.get(stream) if isinstance(applied, dict) else None
            newest, dead = bus_facts[(spec.name, stream)] if isinstance(bus_facts, dict) else (None, None)
            rows.append({
                "loader": spec.name, "stream": stream, "applied_seq": done, "newest_seq": newest,
                "lag": max(newest - done, 0) if newest is not None and done is not None else None,
                "dead_letters": dead, "error": "; ".join(errors) or None,
            })
    return rows


def _bus_facts(bus: Bus, loaders: list[AnyLoaderSpec]) -> dict[tuple[str, str], tuple[int, int]]:
    """(loader, stream) -> (the stream's newest seq, its dead-letter stream's length), over one connection."""
    return {(spec.name, stream): (newest_seq(bus, stream), bus.length(spec.dead_letters_of(stream)))
            for spec in loaders for stream in spec.streams}


def _applied(spec: AnyLoaderSpec) -> dict[str, int] | str:
    """Each stream's last applied seq in the target (0: none yet), or why it could not be read."""
    if isinstance(spec, JsonlLoaderSpec):
        try:
            return {s: last_seq(spec.directory, s, repair=False) for s in spec.streams}
        except FileNotFoundError:  # the file being written was renamed as it closed: look once more
            return {s: last_seq(spec.directory, s, repair=False) for s in spec.streams}
        except Exception as exc:  # an unreadable file: the loader itself would refuse to start on it
            return f"target: {describe(exc)}"
    if missing_sqlite(spec.url) is not None:
        return dict.fromkeys(spec.streams, 0)
    applied, _ = bookkeeping(MetaData(), spec.db_schema)
    engine = target_engine(spec.url)
    try:
        with engine.connect() as conn:
            if not engine.dialect.has_table(conn, applied.name, schema=spec.db_schema):
                return dict.fromkeys(spec.streams, 0)
            rows = conn.execute(select(applied.c.stream, applied.c.seq).where(applied.c.stream.in_(spec.streams)))
            found = {str(stream): int(seq) for stream, seq in rows}
    except Exception as exc:  # down, refusing, wrong password
        return f"target unreachable ({describe(exc)})"
    finally:
        engine.dispose()
    return {s: found.get(s, 0) for s in spec.streams}
