"""What each bus calls things, without importing any bus client: URL schemes, and the stream names
each bus can take. The configuration checks names at load with these; the bus modules use them too."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

REDIS_SCHEMES = ("redis", "rediss", "unix")
NATS_SCHEMES = ("nats", "tls")
RABBITMQ_SCHEMES = ("rabbitmq-stream", "rabbitmq-stream+tls")

BusKind = Literal["redis", "nats", "rabbitmq"]


def bus_kind(url: str) -> BusKind:
    """Which bus a (checked) URL names; also its name in operators' lines (`straw check`, `status`, `stream`)."""
    scheme = urlsplit(url).scheme.lower()
    if scheme in NATS_SCHEMES:
        return "nats"
    return "rabbitmq" if scheme in RABBITMQ_SCHEMES else "redis"


@dataclass(frozen=True, slots=True)
class JetStreamOptions:
    """The JetStream stream the subjects live in, and how straw creates it when it is missing."""

    stream: str = "straw"
    max_age: float | None = None  # seconds; None keeps messages until max_bytes/maxlen
    max_bytes: int | None = None
    duplicate_window: float = 120.0
    replicas: int = 1


_STREAM_NAME = re.compile(r"^[^.*>\s/\\]{1,255}$")  # JetStream stream names: no '.', '*', '>', blanks, slashes
RABBITMQ_MAX_NAME_BYTES = 255


def subject_problem(name: str) -> str | None:
    """Why NATS cannot take a straw stream name as a subject, or None.

    Subjects are tokens split on '.': an empty token (a leading, trailing or
    doubled dot) is invalid, and '*' / '>' tokens are wildcards.
    """
    tokens = name.split(".")
    if any(not token for token in tokens):
        return f"'{name}' has an empty subject token (a leading, trailing or doubled '.'); NATS subjects cannot"
    if any(token in ("*", ">") or any(c.isspace() for c in token) for token in tokens):
        return f"'{name}' holds a wildcard or a blank; a NATS subject to publish to cannot"
    return None


def stream_name_problem(name: str) -> str | None:
    if _STREAM_NAME.match(name):
        return None
    return f"'{name}' cannot name a JetStream stream: no '.', '*', '>', blanks or slashes, at most 255 characters"


def rabbitmq_name_problem(stream: str) -> str | None:
    """Why RabbitMQ cannot take `stream` as a stream name, or None."""
    if len(stream.encode()) > RABBITMQ_MAX_NAME_BYTES:
        return f"is longer than {RABBITMQ_MAX_NAME_BYTES} bytes, RabbitMQ's limit for a stream name"
    if stream.startswith("amq."):
        return "starts with `amq.`, which RabbitMQ reserves for itself"
    return None
