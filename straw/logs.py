"""Structured logs to stderr, secrets redacted; JSON when STRAW_LOG_FORMAT=json."""

from __future__ import annotations

import logging
import os
import sys

import structlog

from straw.redact import redact_event


def setup(level: str | None = None) -> None:
    chosen = (level or os.environ.get("STRAW_LOG_LEVEL") or "INFO").upper()
    as_json = os.environ.get("STRAW_LOG_FORMAT", "console") == "json"
    renderer = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
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
