"""The canonical record on the wire: a CloudEvents 1.0 event in structured JSON.

One stream entry carries one event, encoded once here and stored as bytes in
the outbox, so the relay never re-encodes and the stream sees exactly what was
committed.
"""

from __future__ import annotations

import datetime as dt
import json
from binascii import hexlify
from decimal import Decimal
from hashlib import blake2b
from typing import Any
from urllib.parse import quote

import orjson

SPECVERSION = "1.0"
CONTENT_TYPE = "application/cloudevents+json"
UPSERTED = "upserted"
DELETED = "deleted"


def source_uri(instance: str, source: str) -> str:
    return f"straw/{instance}/{source}"


def subject(key_values: tuple[Any, ...]) -> str:
    """The entity key as text; composite keys join their parts with '/', each part escaped."""
    if len(key_values) == 1:
        return subject_part(key_values[0])
    return "/".join(quote(subject_part(v), safe="") for v in key_values)


def subject_part(value: Any) -> str:
    """One key field as text: the whole subject of a one-field key."""
    if isinstance(value, (dt.date, dt.datetime)):
        return value.isoformat()
    return str(value)


def event_id(source: str, key: str, position: str) -> str:
    """Same change read twice -> same id; any later change (new position) -> a new id."""
    digest = blake2b(f"{source}\x1f{key}\x1f{position}".encode(), digest_size=16)
    return digest.hexdigest()


def observed_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class Envelope:
    """The parts of an event that a whole batch shares, encoded to JSON once.

    Per row only the id, the subject and the data are encoded; the bytes are the
    same as encoding the whole envelope object with orjson.
    """

    def __init__(self, *, source: str, entity: str, op: str, time: str) -> None:
        self.source = source
        self.type = f"{entity}.{op}"
        self.time = time
        # The id hashes source, key and position: the source's part is absorbed once, each row copies the state.
        self._id_hash = blake2b(f"{source}\x1f".encode(), digest_size=16)
        self._head = b'{"specversion":"' + SPECVERSION.encode() + b'","id":"'
        self._middle = b'","source":' + orjson.dumps(source) + b',"type":' + orjson.dumps(self.type) + b',"subject":'
        self._tail = b',"time":' + orjson.dumps(time) + b',"datacontenttype":"application/json","data":'

    def encode(self, key: str, position: str, data: dict[str, Any]) -> bytes:
        id_hash = self._id_hash.copy()
        id_hash.update(f"{key}\x1f{position}".encode())
        try:
            body = orjson.dumps(data)
        except TypeError:
            # orjson stops at 64-bit integers; legacy NUMERIC(30) keys do not.
            body = json.dumps(data, default=_json_default, separators=(",", ":"), ensure_ascii=False).encode()
        event_id = hexlify(id_hash.digest())
        return b"".join((self._head, event_id, self._middle, orjson.dumps(key), self._tail, body, b"}"))


def encode_event(
    *, source: str, entity: str, op: str, key: str, position: str, time: str, data: dict[str, Any]
) -> bytes:
    """One event on its own; a batch should build one `Envelope` and reuse it."""
    return Envelope(source=source, entity=entity, op=op, time=time).encode(key, position, data)


def _json_default(value: Any) -> Any:
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if isinstance(value, Decimal):
        return format(value, "f")
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
