"""The loaders' dead-letter streams on each bus, as `straw dlq` reads, retries and drops them.

Every bus keeps a dead letter with the same fields: `stream`, `entry`, `group`, `consumer`, `deliveries`,
`error`, `at`, the record's `seq` and its `event`.

What each bus can do with one:
- Redis: `retry` sends the record back to its stream for its group only (the other groups ack it unseen) and
  deletes it from the dead-letter stream, in one transaction; `drop` deletes it.
- NATS JetStream: a record cannot go back to its subject (the subject's last message is the publisher's
  checkpoint), so `retry` applies it to its loader's target here and now (unless the target holds a newer
  change of its key), then deletes the dead letter; `drop` deletes it (a stream message delete).
- RabbitMQ Streams: a stream is append-only: `retry` applies the record to the target here, as on NATS, and the
  dead letter stays listed until the stream's retention removes it; `drop` is refused with that line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import nats.js.errors
import redis

from bus.names import JetStreamOptions
from bus.rabbitmq import RabbitStreamBus, body_of, properties_of
from bus.seam import BusDown
from loaders.nats_consumer import DLQ_HEADERS, NatsLoop
from loaders.redis_consumer import RETRY_GROUP

FIELDS = ("stream", "entry", "group", "consumer", "deliveries", "error", "at")
# A record applied here, not on its stream: a callable that applies the dead letter's fields, or says why not.
ApplyHere = Callable[[dict[str, str]], str]


class CannotOnThisBus(Exception):
    """The bus cannot do this to a dead letter: the message is the operator's one line."""


class DeadLetterStore(Protocol):
    def newest(self, dlq: str, limit: int) -> list[tuple[str, dict[str, str]]]:
        """Up to `limit` dead letters, newest first: (entry id, fields)."""
        ...

    def get(self, dlq: str, entry: str) -> dict[str, str] | None: ...

    def retry(self, dlq: str, entry: str, fields: dict[str, str], apply_here: ApplyHere) -> str: ...

    def drop(self, dlq: str, entry: str) -> bool: ...

    def close(self) -> None: ...


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class RedisDeadLetters:
    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def newest(self, dlq: str, limit: int) -> list[tuple[str, dict[str, str]]]:
        entries: Any = self.client.xrevrange(dlq, count=limit)
        return [(_text(i), {_text(k): _text(v) for k, v in (f or {}).items()}) for i, f in entries]

    def get(self, dlq: str, entry: str) -> dict[str, str] | None:
        found: Any = self.client.xrange(dlq, min=entry, max=entry, count=1)
        return {_text(k): _text(v) for k, v in (found[0][1] or {}).items()} if found else None

    def retry(self, dlq: str, entry: str, fields: dict[str, str], apply_here: ApplyHere) -> str:
        """Back to its stream, for its group only, and out of the dead-letter stream, in one transaction."""
        resent: dict[str, str] = {k: fields[k] for k in ("seq", "pos", "event") if k in fields}
        resent.update({"retry": f"{dlq}:{entry}", RETRY_GROUP: fields.get("group", "")})
        pipe = self.client.pipeline(transaction=True)
        pipe.xadd(fields["stream"], resent)  # type: ignore[arg-type]
        pipe.xdel(dlq, entry)
        new_id = _text(pipe.execute()[0])
        return f"sent back to {fields['stream']} as {new_id} for group {fields.get('group')}"

    def drop(self, dlq: str, entry: str) -> bool:
        return bool(self.client.xdel(dlq, entry))

    def close(self) -> None:
        self.client.close()


class NatsDeadLetters:
    def __init__(self, url: str, options: JetStreamOptions, timeout: float = 10.0) -> None:
        self.io = NatsLoop(url, timeout)
        self.stream = options.stream

    async def _get(self, seq: int, subject: str, next_one: bool) -> tuple[str, dict[str, str]] | None:
        js = await self.io.connect()
        try:
            msg = await js.get_msg(self.stream, seq, subject=subject, next=next_one)
        except nats.js.errors.NotFoundError:
            return None
        if msg.subject != subject:
            return None
        headers = dict(msg.headers or {})
        fields = {name: headers.get(header, "") for name, header in zip(FIELDS, DLQ_HEADERS, strict=True)}
        fields.update({"seq": headers.get("Straw-Seq", ""), "event": (msg.data or b"").decode("utf-8", "replace")})
        return str(msg.seq), fields

    def newest(self, dlq: str, limit: int) -> list[tuple[str, dict[str, str]]]:
        async def walk() -> list[tuple[str, dict[str, str]]]:
            found: list[tuple[str, dict[str, str]]] = []
            seq = 1
            while (hit := await self._get(seq, dlq, True)) is not None:
                found = [hit, *found][:limit]
                seq = int(hit[0]) + 1
            return found

        return self.io.run(walk(), timeout=max(self.io.timeout, 60.0))

    def get(self, dlq: str, entry: str) -> dict[str, str] | None:
        if not entry.isdigit():
            return None
        hit = self.io.run(self._get(int(entry), dlq, False))
        return hit[1] if hit else None

    def retry(self, dlq: str, entry: str, fields: dict[str, str], apply_here: ApplyHere) -> str:
        said = apply_here(fields)
        if said.startswith("still"):
            return said
        self.drop(dlq, entry)
        return said

    def drop(self, dlq: str, entry: str) -> bool:
        async def delete() -> bool:
            js = await self.io.connect()
            try:
                return bool(await js.delete_msg(self.stream, int(entry)))
            except nats.js.errors.NotFoundError:
                return False

        return self.io.run(delete())

    def close(self) -> None:
        self.io.close()


class RabbitDeadLetters:
    def __init__(self, url: str, timeout: float = 10.0) -> None:
        self.bus = RabbitStreamBus(url, socket_timeout=timeout)

    def _all(self, dlq: str) -> list[tuple[str, dict[str, str]]]:
        newest = self.bus.newest(dlq, 1)
        if not newest:
            return []
        messages = self.bus.read_all(dlq)
        first = int(newest[0].entry_id) - len(messages) + 1  # offsets are contiguous along a stream
        found = []
        for offset, message in enumerate(messages, first):
            fields = {k: _text(v) for k, v in properties_of(message).items()}
            fields["event"] = body_of(message).decode("utf-8", "replace")
            found.append((str(offset), fields))
        return found

    def newest(self, dlq: str, limit: int) -> list[tuple[str, dict[str, str]]]:
        return list(reversed(self._all(dlq)))[:limit]

    def get(self, dlq: str, entry: str) -> dict[str, str] | None:
        return next((fields for offset, fields in self._all(dlq) if offset == entry), None)

    def retry(self, dlq: str, entry: str, fields: dict[str, str], apply_here: ApplyHere) -> str:
        said = apply_here(fields)
        if said.startswith("still"):
            return said
        return f"{said}; it stays listed in {dlq} (a RabbitMQ stream cannot delete one message) until retention " \
               "removes it"

    def drop(self, dlq: str, entry: str) -> bool:
        raise CannotOnThisBus(
            f"{dlq}:{entry}: a RabbitMQ stream is append-only and cannot delete one message; the dead letter stays "
            "until the stream's retention (max-age / max-length-bytes) removes it")

    def close(self) -> None:
        self.bus.close()


def open_dead_letters(url: str, jetstream: JetStreamOptions | None, redis_client: Callable[[], redis.Redis],
                      kind: str) -> DeadLetterStore:
    if kind == "nats":
        return NatsDeadLetters(url, jetstream or JetStreamOptions())
    if kind == "rabbitmq":
        return RabbitDeadLetters(url)
    return RedisDeadLetters(redis_client())


__all__ = ["BusDown", "CannotOnThisBus", "DeadLetterStore", "open_dead_letters"]
