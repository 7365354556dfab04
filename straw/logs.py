"""Structured logs to stderr, secrets redacted; console, JSON or key=value lines."""

from __future__ import annotations

import logging
import os
import sys

import structlog

from straw.redact import redact_event


def setup(level: str | None = None, format: str = "console") -> None:
    """`format`: console, json or keyvalue (`key=value` pairs, for log shippers that split on them);
    STRAW_LOG_FORMAT, when set, wins."""
    chosen = (level or os.environ.get("STRAW_LOG_LEVEL") or "INFO").upper()
    chosen_format = os.environ.get("STRAW_LOG_FORMAT") or format
    renderer: structlog.typing.Processor
    if chosen_format == "json":
        renderer = structlog.processors.JSONRenderer()
    elif chosen_format == "keyvalue":
        renderer = structlog.processors.KeyValueRenderer(key_order=["timestamp", "level", "event"], drop_missing=True)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact_event,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping().get(chosen, 20)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
