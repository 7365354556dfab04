"""One active poller per stream across hosts: a lease in Redis, and a fence for the holder that lost it.

Two or more straw instances (each with its own outbox) share one Redis. Each stream
has a lease key, `SET NX PX` by the instance that polls its sources, renewed every
third of the TTL by a thread of its own (so a long poll keeps it) and deleted on a clean
stop; the others stand by and take it when it lapses. The lease is per stream, not per
source, because a stream has one checkpoint: the relay's compare-and-publish lets one
outbox at a time continue its `seq`.

Taking over, the new holder *claims* the stream's checkpoint in one script: it moves
`seq` up by FENCE_GAP and writes its own outbox identity. A stale holder (SIGSTOPped,
partitioned) that wakes up with records from its last poll finds their `seq` at or below
the checkpoint's, so its relay refuses them as split brain and publishes nothing over
the new holder; on its next start (or at once, standing by) those fenced records are
dropped, since the new holder re-read their changes from the checkpoint's positions. The
keyed state of the stream's snapshot sources and key sweeps is rebuilt from the stream in
the same takeover (`straw/handover.py`).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import redis
import structlog

from bus.redis import checkpoint_key, connect, read_checkpoint
from bus.seam import Checkpoint
from outbox.store import Outbox
from straw.config import Config, LeaseSpec
from straw.handover import Handed, rebuild

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

log = structlog.get_logger("straw.lease")

# How far a takeover moves the checkpoint's seq: more than any stale holder can have written
# since it last published (a stream's consumers see a jump in `seq`, never a repeat).
FENCE_GAP = 1_000_000_000


def lease_key(stream: str) -> str:
    # The checkpoint's hash slot, so the claim can check the lease and move the checkpoint in one script.
    return checkpoint_key(stream).replace("straw:ckpt:", "straw:lease:", 1)


_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# KEYS: lease, checkpoint. ARGV: node, our outbox identity, gap. Returns {claimed, seq}: claimed is -1 when the
# lease is not ours (any more), 0 when we published last (nothing to fence), 1 when seq moved by the gap.
_CLAIM = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return {-1, 0}
end
local state = redis.call('HMGET', KEYS[2], 'seq', 'outbox')
local seq = tonumber(state[1] or '0')
if state[2] == ARGV[2] then
  return {0, seq}
end
seq = seq + tonumber(ARGV[3])
redis.call('HSET', KEYS[2], 'seq', seq, 'outbox', ARGV[2])
return {1, seq}
"""


@dataclass
class _State:
    held_until: float = 0.0  # monotonic; the lease counts as ours before this
    next_try: float = 0.0  # monotonic; when to try to take it (not held)
    standing_by: bool = False  # said so in the log
    unreachable: bool = False  # said so in the log (once per outage, not at every attempt)


class Leases:
    """The leases of this instance's streams: which it holds now, renewed and taken as time passes."""

    def __init__(self, client: redis.Redis, spec: LeaseSpec, streams: Iterable[str]) -> None:
        self.client = client
        self.ttl = spec.ttl
        self.node = spec.node
        self._states = {stream: _State() for stream in streams}
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._claim = client.register_script(_CLAIM)
        self._lock = threading.Lock()  # the renewing thread reports lost leases to the loop
        self._lost: list[str] = []

    def holds(self, stream: str, now: float | None = None) -> bool:
        state = self._states.get(stream)
        return state is not None and (time.monotonic() if now is None else now) < state.held_until

    def tick(self, now: float) -> tuple[list[str], list[str]]:
        """Try for the leases not held (when due); return the streams just taken (to be claimed), and those
        the renewer found lost since the last tick."""
        taken: list[str] = []
        for stream, state in self._states.items():
            if now < state.next_try or now < state.held_until:
                continue
            sent = time.monotonic()
            try:
                ok = bool(self.client.set(lease_key(stream), self.node, nx=True, px=round(self.ttl * 1000)))
            except redis.RedisError as exc:
                self._unreachable(state, stream, exc)
                state.next_try = now + self.ttl / 10
                continue
            state.unreachable = False
            if ok:
                # Counted from before the command was sent, less a margin: Redis starts the TTL later than that.
                state.held_until = sent + self.ttl * 0.8
                state.standing_by = False
                taken.append(stream)
                log.info("lease taken", stream=stream, node=self.node)
            else:
                if not state.standing_by:
                    state.standing_by = True
                    log.info("standing by: another node holds the lease", stream=stream, node=self.node)
                state.next_try = now + self.ttl / 5  # a lapsed lease is taken within TTL + this
        with self._lock:
            lost, self._lost = self._lost, []
        return taken, lost

    def renew(self) -> None:
        """Renew every lease held (a thread does, every third of the TTL, so a long poll keeps its lease)."""
        for stream, state in self._states.items():
            sent = time.monotonic()
            if sent >= state.held_until:
                continue
            try:
                ok = bool(self._renew(keys=[lease_key(stream)], args=[self.node, round(self.ttl * 1000)]))
            except redis.RedisError as exc:
                # Still ours locally until `held_until`: it lapses in Redis no earlier.
                self._unreachable(state, stream, exc)
                continue
            state.unreachable = False
            if ok:
                state.held_until = sent + self.ttl * 0.8
            else:
                state.held_until = 0.0
                state.next_try = 0.0
                with self._lock:
                    self._lost.append(stream)
                log.warning("lease lost to another node", stream=stream, node=self.node)

    def renew_until(self, stop: threading.Event) -> None:
        while not stop.wait(self.ttl / 3):
            self.renew()

    @staticmethod
    def _unreachable(state: _State, stream: str, exc: Exception) -> None:
        if not state.unreachable:  # said once per outage, not at every attempt
            state.unreachable = True
            log.warning("lease: redis unreachable; trying again", stream=stream, error=type(exc).__name__)

    def next_try(self) -> float:
        """The monotonic time of the next attempt at a lease not held."""
        return min((s.next_try for s in self._states.values() if not s.held_until), default=float("inf"))

    def claim(self, outbox: Outbox, stream: str, sources: Sequence[Handed]) -> bool:
        """Fence the previous holder and continue from the checkpoint; False if the lease is gone meanwhile.

        The keyed state of `sources` (snapshots, listings, key sweeps) is rebuilt from the stream
        (`straw/handover.py`) in the takeover's transaction.
        """
        claimed, seq = self._claim(keys=[lease_key(stream), checkpoint_key(stream)],
                                   args=[self.node, outbox.identity, FENCE_GAP])
        if claimed < 0:
            self._states[stream].held_until = 0.0
            return False
        if claimed:
            # Owed from now on, durably: if reading the stream or the takeover fails, the next claim finds the
            # checkpoint ours already (claimed 0) and must still take over.
            outbox.owe_take_over(stream)
        if claimed or outbox.owes_take_over(stream):
            ckpt = read_checkpoint(self.client, stream)
            rebuilt = rebuild(self.client, stream, int(seq), sources)
            if rebuilt is not None:
                outbox.stage_handover(rebuilt)  # no lock on the outbox while the stream is read
            dropped = outbox.take_over(stream, int(seq), ckpt.positions, [s.name for s in sources], rebuilt)
            log.info("took over stream", stream=stream, seq=int(seq), fenced_records_dropped=dropped,
                     positions=len(ckpt.positions),
                     **({} if rebuilt is None else {"keyed_events_read": rebuilt.events, "keyed_keys": rebuilt.keys,
                                                    "keyed_state_exact": rebuilt.exact}))
        return True

    def drop(self, stream: str) -> None:
        """Count the lease as not ours (a failed claim): tried again at the next attempt."""
        self._states[stream].held_until = 0.0

    def release(self) -> None:
        """A clean stop: let a standby take over at once rather than after the TTL."""
        for stream, state in self._states.items():
            if state.held_until:
                with contextlib.suppress(redis.RedisError):  # it lapses by itself
                    self._release(keys=[lease_key(stream)], args=[self.node])
                state.held_until = 0.0


def drop_fenced(client: redis.Redis, outbox: Outbox, streams: Iterable[str]) -> int:
    """Records this outbox can never publish: another outbox claimed the stream above their `seq`.

    Run before the relay starts (and by a standby), so a holder that lost its lease does
    not stop at split brain on every start. Their changes were re-read by the new holder.
    """
    dropped = 0
    for stream in streams:
        if not outbox.stream_known(stream):
            continue
        ckpt: Checkpoint = read_checkpoint(client, stream)
        if ckpt.outbox not in (None, outbox.identity):
            dropped += outbox.drop_unpublished(stream, ckpt.seq)
    if dropped:
        log.info("dropped records fenced by a newer lease holder", records=dropped)
    return dropped


def holders(client: redis.Redis, streams: Iterable[str]) -> dict[str, str | None]:
    """Which node holds each stream's lease now (None: no one), for `straw status` and the status page."""
    found: dict[str, str | None] = {}
    for stream in streams:
        value = client.get(lease_key(stream))
        found[stream] = value.decode() if isinstance(value, bytes) else value
    return found


class LeaseStatus:
    """What `straw run` shows of its leases on the metrics port (`straw.web.LeaseView`, and `straw_lease_held`).

    `leases` is read when asked: the port is served before the leases are set up.
    """

    def __init__(self, config: Config, leases: Callable[[], Leases | None], timeout: float = 1.0) -> None:
        self.config = config
        self._leases = leases
        self._timeout = timeout  # the page and /readyz answer while Redis hangs
        self._client: redis.Redis | None = None

    def holders(self) -> dict[str, str] | None:
        """Source -> node holding its stream's lease (a lapsed lease: left out); None while not known."""
        if self._leases() is None:
            return None
        if self._client is None:
            self._client = connect(self.config.bus_spec.url, socket_timeout=self._timeout)
        try:
            found = holders(self._client, self.config.streams)
        except redis.RedisError:
            return None
        return {spec.name: node for spec in self.config.sources if (node := found.get(spec.stream)) is not None}

    def describe(self) -> str:
        leases = self._leases()
        if leases is None:
            return "lease: not set up yet"
        held = sum(leases.holds(stream) for stream in self.config.streams)
        return f"lease: node {leases.node}, ttl {leases.ttl:g} s; holds {held} of {len(self.config.streams)} stream(s)"

    def collector(self) -> LeaseMetrics:
        """For the metrics registry (which would take `describe` for its own protocol's)."""
        return LeaseMetrics(self)

    def held(self) -> Iterator[Metric]:
        """`straw_lease_held`: which streams this node polls now (from its own state: no Redis call)."""
        from prometheus_client.core import GaugeMetricFamily  # only with metrics configured (40 ms at import)

        leases = self._leases()
        held = GaugeMetricFamily("straw_lease_held", "1 if this node holds the stream's lease (polls its sources), "
                                 "else 0 (standing by).", labels=["stream", "node"])
        node = leases.node if leases is not None else (self.config.lease.node if self.config.lease else "")
        for stream in self.config.streams:
            held.add_metric([stream, node], 1.0 if leases is not None and leases.holds(stream) else 0.0)
        yield held

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


class LeaseMetrics:
    """A prometheus_client collector: `straw_lease_held` per stream."""

    def __init__(self, status: LeaseStatus) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        return self.status.held()
