"""The consumer seam on Redis Streams: XREADGROUP, XAUTOCLAIM, XACK and a dead-letter stream.

Delivery counts are Redis's own (the PEL counter that XREADGROUP and XAUTOCLAIM raise), so they survive a
crash of every consumer. Entries sent again by `straw dlq retry` carry the group they are meant for; other
groups ack them unseen, as they applied the original already.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from collections.abc import Callable, Iterator, Sequence
from itertools import groupby
from operator import itemgetter
from typing import Any

import hiredis
import redis
from redis.connection import Connection

from bus.redis import REDIS_DOWN, REDIS_REFUSED  # the relay's: refused credentials are final, not down
from loaders.consumer import BusDown
from loaders.records import Delivery
from straw.redact import describe

RETRY_GROUP = "retry_group"  # field of an entry sent again by `straw dlq retry`: the group it is for
IDLE_CONSUMER = 3600.0  # a member with nothing pending and idle this long is gone: removed from the group
_CLAIM_MAX = 1000


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _as_parsed(response: Any, **_options: Any) -> Any:
    return response


_STREAM, _ENTRY_ID = itemgetter(0), itemgetter(1)


def _by_stream(deliveries: Sequence[Delivery]) -> dict[str, list[str]]:
    # A batch is mostly one run of one stream: grouped and gathered in C, not a Python step per entry.
    by_stream: dict[str, list[str]] = {}
    for stream, run in groupby(deliveries, _STREAM):
        by_stream.setdefault(stream, []).extend(map(_ENTRY_ID, run))
    return by_stream


def ensure_group(client: redis.Redis, stream: str, group: str, start: str) -> bool:
    """Create the group (and the stream) if missing; True if it was created."""
    try:
        client.xgroup_create(stream, group, id="0" if start == "begin" else "$", mkstream=True)
        return True
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
        return False


class RedisConsumer:
    def __init__(
        self,
        client: redis.Redis,
        streams: Sequence[str],
        group: str,
        consumer: str,
        *,
        claim_idle: float,
        dead_letters: Callable[[str], str],
        start: str = "begin",
        adopt: bool = False,
    ) -> None:
        """`adopt`: this member is its group's only one (a JSON Lines loader, which writes in stream order): at
        start, and after the bus was lost, it takes every entry pending in the group, whoever held it (a
        previous run under another name, on another host), and applies those first, in stream order."""
        # Decoding in the client (hiredis) is several times faster than per field here; a byte that is not
        # UTF-8 becomes U+FFFD, and the record then fails to parse: a dead letter, never an exception.
        pool = client.connection_pool
        self._client: redis.Redis = redis.Redis(connection_pool=redis.ConnectionPool(
            connection_class=pool.connection_class,
            **{**pool.connection_kwargs, "decode_responses": True, "encoding_errors": "replace"}))
        # XREADGROUP's reply as hiredis parsed it (nested lists, or a map on RESP3): `_read` takes the entries
        # from it directly, not through redis-py's per-entry dicts and tuples.
        self._client.set_response_callback("XREADGROUP", _as_parsed)
        self._given = client
        self._streams = list(streams)
        self._group = group
        self._name = consumer
        self._claim_ms = max(1, int(claim_idle * 1000))
        self._claim_every = max(0.05, claim_idle / 2)
        self._dead_letters = dead_letters
        self._own_backlog = True  # after a restart under the same name, our own unacked entries come first
        self._adopt = adopt
        self._adopted = False  # in this backlog phase
        self._next_claim = 0.0
        self._claim_from = dict.fromkeys(self._streams, "0-0")
        self._flight: Connection | None = None  # split-phase commands sent, replies not taken yet (see collect)
        self._expected: list[str] = []  # what each of those replies is: "read" or "ack"
        for stream in self._streams:
            ensure_group(client, stream, group, start)
        self._forget_idle_members()

    @property
    def name(self) -> str:
        return self._name

    def _down(self, exc: Exception) -> BusDown:
        """The bus is unreachable. Entries handed out and not applied (the batch read ahead, dropped by the SDK)
        stay pending for this member: the next read takes them first, as after a restart, not newer ones
        before them (a target that skips by `seq`, JSON Lines, would skip them for good when they came back
        through a reclaim after newer ones)."""
        self._own_backlog = True
        self._adopted = False
        return BusDown(describe(exc))

    def _forget_idle_members(self) -> None:
        """Crashed members with nothing pending would stay listed forever (XINFO CONSUMERS grows)."""
        for stream in self._streams:
            for member in self._client.xinfo_consumers(stream, self._group):
                name = _text(member["name"])
                if name != self._name and int(member["pending"]) == 0 and int(member["idle"]) > IDLE_CONSUMER * 1000:
                    self._client.xgroup_delconsumer(stream, self._group, name)

    def read(self, count: int, block: float) -> list[Delivery]:
        if self._flight is not None:  # its entries would be handed out by neither call until reclaimed
            raise RuntimeError("split-phase commands in flight: collect() their replies before a read")
        try:
            return self._next(count, block)
        except REDIS_REFUSED:
            raise
        except REDIS_DOWN as exc:
            raise self._down(exc) from exc

    def _next(self, count: int, block: float) -> list[Delivery]:
        if self._own_backlog and self._adopt and not self._adopted:
            self._adopt_pending()
            self._adopted = True
        if self._own_backlog:
            found = self._read("0", count, None)
            if found:
                return self._counted(found)
            self._own_backlog = False
        if time.monotonic() >= self._next_claim:
            claimed = self._claim(count)
            if claimed:
                return claimed
            self._next_claim = time.monotonic() + self._claim_every
        return self._foreign_ones_acked(self._read(">", count, block))

    def _adopt_pending(self) -> None:
        """Every entry pending in the group becomes this member's (JUSTID: no delivery is counted for it)."""
        for stream in self._streams:
            cursor = "0-0"
            while True:
                # Sent as a command: redis-py's xautoclaim(justid=True) keeps the ids and drops the cursor.
                reply: Any = self._client.execute_command(  # type: ignore[no-untyped-call]
                    "XAUTOCLAIM", stream, self._group, self._name, 0, cursor, "COUNT", 1000, "JUSTID")
                cursor = _text(reply[0])
                if cursor == "0-0":
                    break

    def read_ahead(self, count: int) -> list[Delivery] | None:
        """New entries, without waiting, for the batch after the one in hand (see loaders/sdk.py); None while
        the next read must be `read`: this member's own backlog (it holds the entries in hand, unacked) or a
        due reclaim (which must not starve behind a busy stream)."""
        if self._own_backlog or time.monotonic() >= self._next_claim:
            return None
        try:
            return self._foreign_ones_acked(self._read(">", count, None))
        except REDIS_REFUSED:
            raise
        except REDIS_DOWN as exc:
            raise self._down(exc) from exc

    def _read(self, start: str, count: int, block: float | None) -> list[Delivery]:
        """XREADGROUP from `start` ('>' new entries, '0' this member's pending ones), as first deliveries."""
        command = self._read_command(start, count, block)
        return self._deliveries(self._client.execute_command(*command))  # type: ignore[no-untyped-call]

    def _read_command(self, start: str, count: int, block: float | None) -> list[Any]:
        command: list[Any] = ["XREADGROUP", "GROUP", self._group, self._name, "COUNT", count]
        if block and block > 0:
            command += ["BLOCK", max(1, int(block * 1000))]
        return [*command, "STREAMS", *self._streams, *[start] * len(self._streams)]

    def _deliveries(self, reply: Any) -> list[Delivery]:
        found: list[Delivery] = []
        append = found.append
        # A named tuple's constructor is a Python-level lambda around tuple.__new__: calling that directly
        # costs a third less a delivery (bench/README.md, Session 6 — jsonl-rate).
        new = tuple.__new__
        for stream, entries in (reply.items() if isinstance(reply, dict) else reply or ()):
            for entry_id, flat in entries:
                if not flat:  # a pending entry trimmed from the stream comes back empty: nothing to apply
                    self._client.xack(_text(stream), self._group, entry_id)
                elif len(flat) == 6 and flat[0] == "seq" and flat[2] == "pos" and flat[4] == "event":
                    # What the relay writes: a literal is several times cheaper than pairing the list.
                    append(new(Delivery, (stream, entry_id, {"seq": flat[1], "pos": flat[3], "event": flat[5]}, 1)))
                else:
                    pairs = iter(flat)
                    append(Delivery(stream, entry_id, dict(zip(pairs, pairs, strict=False)), 1))
        return found

    # Split-phase commands (loaders/sdk.py, `read_ahead="pipelined"`): the next batch's XREADGROUP is sent before
    # the target applies this one and its reply taken after, so Redis builds the reply while this process works;
    # the ack of a batch (sent only once it is applied) travels with the next read. One connection held from the
    # first send to `collect`, replies read in the order sent; a failure anywhere drops that connection (its
    # state is unknown), so no later reply is ever taken for another command's.

    def send_read_ahead(self, count: int) -> bool:
        """Send `XREADGROUP >` (no wait) for the batch after the one in hand; its entries come from `collect`.
        False, nothing sent, where the next read must be `read` (as for `read_ahead`)."""
        if self._own_backlog or time.monotonic() >= self._next_claim:
            return False
        self._send([self._read_command(">", count, None)], "read")
        return True

    def send_ack(self, deliveries: Sequence[Delivery]) -> None:
        """Send the XACK of applied entries; `collect` takes its reply (and raises what acking raised)."""
        self._send([["XACK", stream, self._group, *ids] for stream, ids in _by_stream(deliveries).items()], "ack")

    def collect(self) -> list[Delivery] | None:
        """Every reply sent for, in order: the read ahead's entries (None: no read was sent)."""
        connection, expected = self._flight, self._expected
        if connection is None:
            return None
        reply: Any = None
        with self._in_flight():
            for kind in expected:
                answer = connection.read_response()
                if kind == "read":
                    reply = answer
        self._land(broken=False)
        return self._foreign_ones_acked(self._deliveries(reply)) if "read" in expected else None

    def _send(self, commands: list[list[Any]], kind: str) -> None:
        with self._in_flight():
            if self._flight is None:
                self._flight = self._client.connection_pool.get_connection()
            # No health check (a PING) behind replies not taken yet: it would take the first of them for its own.
            # hiredis packs str and int arguments as redis-py would, without its per-argument pass (500 ids).
            packed = [hiredis.pack_command(tuple(command)) for command in commands]
            self._flight.send_packed_command(packed, check_health=not self._expected)  # type: ignore[no-untyped-call]
        self._expected.extend([kind] * len(commands))

    @contextlib.contextmanager
    def _in_flight(self) -> Iterator[None]:
        """Any failure drops the held connection (an error reply too, e.g. NOGROUP: the replies behind it are
        never read); a lost connection is BusDown, as for every other command."""
        try:
            yield
        except REDIS_REFUSED:
            self._land(broken=True)
            raise
        except REDIS_DOWN as exc:
            self._land(broken=True)
            raise self._down(exc) from exc
        except BaseException:
            self._land(broken=True)
            raise

    def _land(self, *, broken: bool) -> None:
        connection, self._flight, self._expected = self._flight, None, []
        if connection is not None:
            if broken:
                connection.disconnect()  # type: ignore[no-untyped-call]
            self._client.connection_pool.release(connection)

    def _claim(self, count: int) -> list[Delivery]:
        """Entries that any member (a dead one, or this one after a failure) left pending past claim_idle."""
        found: list[Delivery] = []
        for stream in self._streams:
            if len(found) >= count:
                break
            reply = self._client.xautoclaim(
                stream, self._group, self._name, self._claim_ms, self._claim_from[stream],
                count=min(_CLAIM_MAX, count - len(found)),
            )
            next_id, entries = _text(reply[0]), reply[1]
            self._claim_from[stream] = next_id  # "0-0" once the scan went round the whole list
            for entry_id, fields in entries:
                if entry_id is not None and fields:
                    found.append(Delivery(stream, entry_id, fields, 1))
        return self._counted(found)

    def _counted(self, found: list[Delivery]) -> list[Delivery]:
        """Redelivered entries with their delivery counts from the group's pending list."""
        pipe = self._client.pipeline(transaction=False)
        for delivery in found:
            pipe.xpending_range(delivery.stream, self._group, min=delivery.entry_id, max=delivery.entry_id, count=1)
        counts = pipe.execute()
        deliveries = [
            delivery._replace(deliveries=int(pending[0]["times_delivered"]) if pending else 1)
            for delivery, pending in zip(found, counts, strict=True)
        ]
        return self._foreign_ones_acked(deliveries)

    def _foreign_ones_acked(self, deliveries: list[Delivery]) -> list[Delivery]:
        """A retried dead letter of another group is not ours: that group applied the rest, we applied this."""
        foreign = [d for d in deliveries if d.fields.get(RETRY_GROUP, self._group) != self._group]
        if foreign:
            self.ack(foreign)
            return [d for d in deliveries if d.fields.get(RETRY_GROUP, self._group) == self._group]
        return deliveries

    def pending(self) -> int:
        try:
            return sum(int(self._client.xpending(s, self._group)["pending"]) for s in self._streams)
        except REDIS_REFUSED:
            raise
        except REDIS_DOWN as exc:
            raise self._down(exc) from exc

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        try:
            self._ack(deliveries)
        except REDIS_REFUSED:
            raise
        except REDIS_DOWN as exc:  # not acked: the entries come back and the target skips them (idempotent)
            raise self._down(exc) from exc

    def _ack(self, deliveries: Sequence[Delivery]) -> None:
        pipe = self._client.pipeline(transaction=False)
        for stream, ids in _by_stream(deliveries).items():
            pipe.xack(stream, self._group, *ids)
        pipe.execute()

    def dead_letter(self, delivery: Delivery, error: str) -> None:
        fields = {
            **{k: v for k, v in delivery.fields.items() if k != RETRY_GROUP},
            "stream": delivery.stream, "entry": delivery.entry_id, "group": self._group, "consumer": self._name,
            "deliveries": str(delivery.deliveries), "error": error[:4000],
            "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        # One transaction: the entry is in the dead-letter stream and acked, or neither.
        pipe = self._client.pipeline(transaction=True)
        pipe.xadd(self._dead_letters(delivery.stream), fields)  # type: ignore[arg-type]
        pipe.xack(delivery.stream, self._group, delivery.entry_id)
        pipe.execute()

    def newest_seq(self, stream: str) -> int:
        """The newest entry's seq; entries `straw dlq retry` sent back carry an old seq and are passed over."""
        try:
            start = "+"
            while True:
                page: Any = self._client.xrevrange(stream, max=start, count=100)
                for _entry, fields in page:
                    if RETRY_GROUP not in fields:
                        return int(fields.get("seq", 0) or 0)
                if len(page) < 100:
                    return 0
                start = "(" + _text(page[-1][0])
        except REDIS_REFUSED:
            raise
        except REDIS_DOWN as exc:
            raise self._down(exc) from exc

    def close(self) -> None:
        self._land(broken=True)  # replies never taken: the connection is not reusable
        self._client.close()
        self._client.connection_pool.disconnect()
        self._given.close()
