"""Redis Streams: the default bus.

A stream is a Redis stream; its checkpoint is a hash beside it (`straw:ckpt:{stream}`,
same hash slot, so Redis Cluster runs the publish script): `seq` (last outbox seq
in the stream), `outbox` (identity of the outbox that wrote it), `at` (when) and
`pos:<source>` per source. One publish is one Lua script call that checks the
checkpoint is what the relay last saw, XADDs the batch in `seq` order and moves
the checkpoint: WATCH/MULTI/EXEC in one round trip and one reply.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

import hiredis
import redis
from redis.connection import HiredisRespSerializer

from bus.seam import BusDown, BusRefused, Checkpoint, Durability, Outgoing, Published

POS_PREFIX = "pos:"

# Refused credentials or permissions are final: waiting does not fix a password. They are caught before
# REDIS_DOWN (redis-py's AuthenticationError is a ConnectionError).
REDIS_REFUSED = (redis.AuthenticationError, redis.exceptions.AuthenticationWrongNumberOfArgsError,
                 redis.exceptions.NoPermissionError)
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, ConnectionError, OSError)


def refused(exc: BaseException) -> BusRefused:
    """The one line for refused credentials: authentication failed, or the ACL user lacks a permission."""
    detail = " ".join(str(exc).split())
    if isinstance(exc, redis.exceptions.NoPermissionError):
        return BusRefused(
            f"Redis authorization failed ({detail}): the ACL user of redis.url needs +@read +@write +@stream "
            "+@scripting +@connection on the streams and their checkpoint keys"
        )
    return BusRefused(f"Redis authentication failed ({detail}): check the user and password in redis.url")


@contextmanager
def translated() -> Iterator[None]:
    """redis-py's errors as the seam's: refused is final, down is retried."""
    try:
        yield
    except REDIS_REFUSED as exc:
        raise refused(exc) from None
    except REDIS_DOWN as exc:
        raise BusDown(f"redis unreachable ({type(exc).__name__}: {exc})") from exc


class _Packer:
    """redis-py's hiredis serializer without its per-argument pass.

    redis-py rebuilds every command's argument tuple to turn bytearray and memoryview
    into bytes: about 1 µs a record in a publish of (seq, pos, event) triples. Ours
    are str, int and bytes, which hiredis packs as they are, into the same bytes; any
    other command, or an argument hiredis refuses (TypeError), takes redis-py's path.
    """

    def __init__(self) -> None:
        self._general = HiredisRespSerializer()

    def pack(self, *args: Any) -> list[bytes]:
        name = args[0]
        # A command name with a space ('CONFIG GET') is split into words by redis-py's packer.
        if type(name) is str and " " not in name:
            try:
                return [hiredis.pack_command(args)]
            except TypeError:
                pass
        return cast(list[bytes], self._general.pack(*args))


def connect(url: str, socket_timeout: float = 10.0) -> redis.Redis:
    return redis.Redis.from_url(
        url, socket_timeout=socket_timeout, socket_connect_timeout=min(socket_timeout, 5.0), health_check_interval=30,
        command_packer=_Packer(),
    )


def hash_tag(key: str) -> str | None:
    """What Redis Cluster hashes `key` on, if not the whole key: between the first `{` and the next `}`.

    Redis's own rule, to the letter (a regex search would find a later tag after an
    empty `{}`, which Redis ignores, and so put the checkpoint in another slot).
    """
    start = key.find("{")
    end = key.find("}", start + 1) if start >= 0 else -1
    return key[start + 1 : end] if end > start + 1 else None


def checkpoint_key(stream: str) -> str:
    """Same hash slot as the stream itself, so Redis Cluster accepts the script.

    A stream key without a hash tag hashes whole, so `{stream}` lands in its slot;
    one that has a tag already hashes on that tag, so we reuse it (and keep the
    whole name after it, so two streams sharing a tag keep two checkpoints).
    A name with braces but no tag (`a{}b`, `a}b`) has no such key; the
    configuration refuses those names.
    """
    tag = hash_tag(stream)
    if tag is not None:
        return f"straw:ckpt:{{{tag}}}:{stream}"
    return f"straw:ckpt:{{{stream}}}"


def parse_checkpoint(raw: dict[Any, Any]) -> Checkpoint:
    text = {_s(k): _s(v) for k, v in raw.items()}
    return Checkpoint(
        seq=int(text.get("seq", 0)),
        outbox=text.get("outbox"),
        positions={k[len(POS_PREFIX):]: v for k, v in text.items() if k.startswith(POS_PREFIX)},
    )


def read_checkpoint(client: redis.Redis, stream: str) -> Checkpoint:
    return parse_checkpoint(client.hgetall(checkpoint_key(stream)))


def _server_version(client: redis.Redis) -> str:
    """The server's version: INFO needs @dangerous, which straw's ACL user lacks; HELLO (@connection) says it too."""
    try:
        return str(client.info("server").get("redis_version", "?"))
    except redis.exceptions.NoPermissionError:
        hello: Any = client.execute_command("HELLO")  # type: ignore[no-untyped-call]  # redis-py types no HELLO
        pairs = hello if isinstance(hello, dict) else dict(zip(hello[::2], hello[1::2], strict=True))
        version = pairs.get(b"version", pairs.get("version", b"?"))
        return version.decode() if isinstance(version, bytes) else str(version)


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# KEYS: stream, checkpoint. ARGV: expected seq, expected outbox, our outbox, time, maxlen ('' = none),
# n position fields, then n (field, value) pairs, then (seq, pos, event) per record.
_PUBLISH = """
local state = redis.call('HMGET', KEYS[2], 'seq', 'outbox')
local seq, owner = state[1] or '0', state[2] or ''
if seq ~= ARGV[1] or owner ~= ARGV[2] then
  return {0, seq, owner}
end
local maxlen = ARGV[5]
local first = 7 + 2 * tonumber(ARGV[6])
local last = seq
for i = first, #ARGV, 3 do
  if maxlen == '' then
    redis.call('XADD', KEYS[1], '*', 'seq', ARGV[i], 'pos', ARGV[i + 1], 'event', ARGV[i + 2])
  else
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', 'seq', ARGV[i], 'pos', ARGV[i + 1], 'event', ARGV[i + 2])
  end
  last = ARGV[i]
end
local fields = {'seq', last, 'outbox', ARGV[3], 'at', ARGV[4]}
for i = 7, first - 1 do
  fields[#fields + 1] = ARGV[i]
end
redis.call('HSET', KEYS[2], unpack(fields))
return {1, last, ARGV[3]}
"""


class RedisBus:
    """The `Bus` on Redis Streams (or a Redis Cluster: a stream and its checkpoint share a slot).

    `durability`: `ack` returns when the primary has the batch in memory; `replicated`
    also waits (WAIT) until `replicas` replicas have it, `fsync` (WAITAOF, Redis 7.2+) until
    the primary and `replicas` replicas have it in their append-only files. A wait that
    times out is `BusDown`: the relay retries, and the records stay in the outbox.
    """

    def __init__(
        self, client: redis.Redis, *, maxlen: int | None = None, durability: Durability | None = None
    ) -> None:
        self.client = client
        self.maxlen = maxlen
        self.durability = durability or Durability()
        self._script = client.register_script(_PUBLISH)

    def checkpoint(self, stream: str) -> Checkpoint:
        with translated():
            ckpt = read_checkpoint(self.client, stream)
            if self.durability.level == "replicated":
                # A checkpoint read after a reconnect settles a publish whose WAIT we never saw: it counts
                # only once the replicas have all the primary holds now (WAIT knows only this connection's writes).
                self._replicas_caught_up()
            return ckpt

    def _replicas_caught_up(self) -> None:
        wanted, deadline = self.durability.replicas, time.monotonic() + self.durability.timeout
        while True:
            info = self.client.info("replication")
            if info.get("role") != "master":
                return  # a replica or a cluster node's view: nothing to compare here
            target = int(info.get("master_repl_offset", 0))
            acked = sum(
                1 for key, value in info.items()
                if key.startswith("slave") and isinstance(value, dict) and int(value.get("offset", -1)) >= target
            )
            if acked >= wanted:
                return
            if time.monotonic() > deadline:
                raise BusDown(self._short(acked, "hold the stream's checkpoint"))
            time.sleep(0.05)

    def _short(self, confirmed: int, what: str) -> str:
        return (f"bus.durability {self.durability.level}: {confirmed} of {self.durability.replicas} replicas "
                f"{what} after {self.durability.timeout:g}s; retrying (the records stay in the outbox)")

    def _wait_durable(self) -> None:
        """Block until the batch just written is as durable as `bus.durability` asks.

        WAIT and WAITAOF count this connection's writes: the relay is one thread, and redis-py's
        pool hands it back the connection the script just used (the last one released).
        """
        level, wanted = self.durability.level, self.durability.replicas
        timeout_ms = max(1, int(self.durability.timeout * 1000))
        if level == "replicated":
            confirmed = int(self.client.wait(wanted, timeout_ms))
            if confirmed < wanted:
                raise BusDown(self._short(confirmed, "confirmed the publish"))
        elif level == "fsync":
            try:
                local, confirmed = self.client.waitaof(1, wanted, timeout_ms)
            except redis.ResponseError as exc:
                raise BusRefused(
                    f"bus.durability fsync needs WAITAOF (Redis 7.2 or newer, with appendonly yes): the server "
                    f"said: {exc}; use `durability: replicated`, or upgrade Redis and turn on its append-only file"
                ) from None
            if int(local) < 1 or int(confirmed) < wanted:
                raise BusDown(self._short(int(confirmed), "wrote the publish to disk"))

    def publish(self, stream: str, seen: Checkpoint, batch: Sequence[Outgoing], identity: str) -> Checkpoint | None:
        positions: dict[str, str] = {}
        records: list[bytes | str | int] = []
        for seq, source, position, event in batch:
            records += (seq, position, event)
            positions[POS_PREFIX + source] = position
        args: list[bytes | str | int] = [
            seen.seq,
            seen.outbox or "",
            identity,
            dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
            self.maxlen or "",
            len(positions),
        ]
        for name, value in positions.items():
            args += (name, value)
        args += records
        with translated():
            done, _seq, _owner = self._script(keys=[stream, checkpoint_key(stream)], args=args)
            if done:
                self._wait_durable()
        if not done:
            return None
        return Checkpoint(batch[-1].seq, identity)

    def describe(self) -> tuple[bool, str]:
        with translated():
            version = _server_version(self.client)
        ok = int(version.split(".")[0]) >= 5 if version[0].isdigit() else False
        return ok, f"version {version}" + ("" if ok else " (streams need Redis 5 or newer)")

    def length(self, stream: str) -> int:
        with translated():
            return int(self.client.xlen(stream))

    def newest(self, stream: str, count: int) -> list[Published]:
        with translated():
            entries = cast(list[tuple[bytes, dict[bytes, bytes]]], self.client.xrevrange(stream, count=count) or [])
        return [Published(key.decode(), int(fields[b"seq"]), fields[b"event"]) for key, fields in reversed(entries)]

    def close(self) -> None:
        self.client.close()
