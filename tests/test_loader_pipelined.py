"""The pipelined read ahead (`Settings(read_ahead="pipelined")`, what `straw load` gives a JSON Lines loader):
the next batch's XREADGROUP sent before this batch is applied and its reply taken after, the ack of a batch sent
only once it is applied, in one thread. Each test holds it to what the threaded read ahead promises: order,
acks only after apply, dead letters as before, and under SIGKILL and a dropped connection nothing acked that
was not written, nothing lost, nothing written twice. (A stop and both RESP protocols: tests/test_loader_sdk.py,
for both read-ahead modes.)"""

from __future__ import annotations

import random
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import orjson
import pytest
import redis

from loaders.jsonl import JsonlLoader
from loaders.records import Record
from loaders.redis_consumer import RedisConsumer
from loaders.sdk import Failed, Settings, TargetDown, consume, each
from straw.config_loaders import JsonlLoaderSpec
from tests.crashes import REPO, straw_command
from tests.loader_helpers import jsonl_seqs, load_then_kill, loader_config, order_data, xadd_events
from tests.test_loader_sdk import ENTITIES, member

PIPELINED = Settings(batch_size=3, claim_idle=60, read_ahead="pipelined")


def test_with_a_backlog_the_next_batch_is_read_before_this_one_is_applied_and_order_holds(
    redis_client: redis.Redis, stream_name: str
) -> None:
    xadd_events(redis_client, stream_name, [("upserted", order_data(n)) for n in range(1, 11)])
    seen: list[int] = []
    pending_at_apply: list[int] = []

    def apply(records: Sequence[Record]) -> Sequence[Failed]:
        # The read ahead travels on another connection than this XPENDING: wait (bounded) for what should be
        # pending by now, then record what is. More would be an ack that did not go out with the read.
        expected = {1: 6, 4: 6, 7: 4, 10: 1}[records[0].seq]
        deadline = time.monotonic() + 5
        while redis_client.xpending(stream_name, "g")["pending"] < expected and time.monotonic() < deadline:
            time.sleep(0.005)
        pending_at_apply.append(int(redis_client.xpending(stream_name, "g")["pending"]))
        seen.extend(r.seq for r in records)
        return []

    tally = consume(member(redis_client, stream_name, claim_idle=60), apply, ENTITIES, PIPELINED, once=True)
    assert seen == list(range(1, 11))  # batches applied one after the other, in stream order
    # While a batch is applied, its own 3 and the next 3 are pending: the previous batch's ack went out with
    # the read and was answered. The last batch (1 record, not full) reads nothing ahead.
    assert pending_at_apply == [6, 6, 4, 1]
    assert tally.applied == 10 and tally.batches == 4
    assert redis_client.xpending(stream_name, "g")["pending"] == 0


def test_a_poison_record_in_a_backlog_is_dead_lettered_as_without_pipelining(
    redis_client: redis.Redis, stream_name: str
) -> None:
    """Entries not a straw record, a value its field's type refuses and a target that refuses one record, in a
    backlog read ahead: each dead-lettered at its max_deliveries-th delivery, the rest applied exactly once."""
    xadd_events(redis_client, stream_name, [("upserted", order_data(n)) for n in range(1, 13)])
    redis_client.xadd(stream_name, {"seq": "13", "pos": "[13]", "event": "[]", "extra": "x"})
    xadd_events(redis_client, stream_name, [("upserted", order_data(14, amount="12,50"))], first_seq=14)
    xadd_events(redis_client, stream_name, [("upserted", order_data(n)) for n in range(15, 25)], first_seq=15)
    applied: list[int] = []
    refused: list[int] = []

    def handle(record: Record) -> None:
        if record.seq == 5:
            refused.append(record.deliveries)
            raise ValueError("numeric field overflow")
        applied.append(record.seq)

    dead: dict[str, list[tuple[bytes, bytes]]] = {}
    modes: tuple[Literal["thread", "pipelined"], ...] = ("thread", "pipelined")
    for mode in modes:
        group = f"g-{mode}"
        consumer = member(redis_client, stream_name, claim_idle=0.1, group=group)
        tally = consume(consumer, each(handle), ENTITIES,
                        Settings(batch_size=4, max_deliveries=2, claim_idle=0.1, read_ahead=mode), once=True)
        assert sorted(applied) == [n for n in range(1, 25) if n not in (5, 13, 14)]
        assert len(applied) == len(set(applied)) and refused == [1, 2]
        assert tally.dead_letters == 3 and redis_client.xpending(stream_name, group)["pending"] == 0
        applied.clear()
        refused.clear()
        entries: Any = redis_client.xrange(f"{stream_name}.dlq")
        dead[mode] = sorted((f[b"seq"], f[b"error"]) for _, f in entries if f[b"group"] == group.encode())
    assert dead["thread"] == dead["pipelined"] and len(dead["pipelined"]) == 3


def test_a_read_while_replies_are_in_flight_is_refused(redis_client: redis.Redis, stream_name: str) -> None:
    """A plain read then would hand out neither the read ahead's entries nor its own until a reclaim."""
    xadd_events(redis_client, stream_name, [("upserted", order_data(n)) for n in range(1, 5)])
    consumer = member(redis_client, stream_name, claim_idle=60)
    assert len(consumer.read(2, 0)) == 2
    assert consumer.send_read_ahead(2)
    with pytest.raises(RuntimeError, match="collect"):
        consumer.read(2, 0)
    assert [d.fields["seq"] for d in consumer.collect() or []] == ["3", "4"]
    assert consumer.collect() is None  # nothing in flight any more


def _acked(client: redis.Redis, stream: str, group: str) -> set[int]:
    """The seqs the group acked: delivered (at or below its last-delivered id) and not pending."""
    groups: Any = client.xinfo_groups(stream)
    [info] = [g for g in groups if g["name"] == group.encode()]
    last = info["last-delivered-id"].decode()
    pending_entries: Any = client.xpending_range(stream, group, "-", "+", 100_000)
    pending = {e["message_id"].decode() for e in pending_entries}
    entries: Any = client.xrange(stream, max=last)
    return {int(f[b"seq"]) for entry, f in entries if entry.decode() not in pending}


@pytest.mark.slow
@pytest.mark.parametrize("naming", ["default", "renamed"])
def test_a_jsonl_loader_killed_at_random_acks_only_what_it_wrote_and_ends_exact(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, stream_name: str, naming: str
) -> None:
    """`default`: restarted as `straw load` names it (`<host>-<loader>`), it finds its own pending entries
    first. `renamed`: each run under a new `--consumer` name (another host, an operator's choice): the entries
    the killed run held are adopted at start, not reclaimed after `claim_idle` behind newer ones, which the
    loader's skip of `seq`s on disk would then drop for good (seen: "At index 5900 diff: 5951 != 5901")."""
    total = 30_000
    xadd_events(redis_client, stream_name, [("upserted", order_data(n)) for n in range(1, total + 1)])
    out = tmp_path / "out"
    config = loader_config(tmp_path, redis_url, [{
        "name": "jl", "kind": "jsonl", "streams": [stream_name], "directory": str(out), "batch_size": 50,
        "claim_idle": "300ms" if naming == "default" else "5s", "block": "200ms"}], stream_name)
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    for kill in range(6):
        named = [] if naming == "default" else ["--consumer", f"m{kill}"]
        load_then_kill(config, out, tmp_path / "load.log", rng.randrange(50, 3000), total, *named)
        acked, lines = _acked(redis_client, stream_name, "jl"), jsonl_seqs(out)
        assert acked <= set(lines), f"acked, never written: {sorted(acked - set(lines))[:10]} (seed {seed})"
        assert lines == list(range(1, len(lines) + 1)), f"not in order or twice (seed {seed})"
    last = [] if naming == "default" else ["--consumer", "last"]
    done = subprocess.run(straw_command(config, "load", "jl", "--once", *last), cwd=REPO,
                          capture_output=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert jsonl_seqs(out) == list(range(1, total + 1))
    assert redis_client.xpending(stream_name, "jl")["pending"] == 0
    assert redis_client.xlen(f"{stream_name}.dlq") == 0


@pytest.mark.parametrize("read_ahead", ["thread", "pipelined"])
def test_a_dropped_connection_mid_read_ahead_loses_and_doubles_nothing(
    tmp_path: Path, redis_url: str, stream_name: str, read_ahead: Literal["thread", "pipelined"]
) -> None:
    """The consumer's connections killed by the server while a read ahead and an ack are in flight, again and
    again: the bus counts as down for a moment, and the batch read ahead, dropped, comes back first (this
    member's own pending entries are read before new ones), not after newer entries through a reclaim, when
    the JSON Lines loader would skip it as written. The files end exact."""
    name = f"pipe-{stream_name[-18:]}"
    client = redis.Redis.from_url(redis_url, client_name=name)
    admin = redis.Redis.from_url(redis_url)
    try:
        total = 3_000
        xadd_events(client, stream_name, [("upserted", order_data(n)) for n in range(1, total + 1)])
        spec = JsonlLoaderSpec(name="jl", kind="jsonl", streams=[stream_name], directory=tmp_path)
        loader = JsonlLoader(spec)
        consumer = RedisConsumer(client, [stream_name], "g", "m1", claim_idle=60, dead_letters=lambda s: f"{s}.dlq")
        drops = 0
        unacked: list[bool] = []

        def apply(records: Sequence[Record]) -> Sequence[Failed]:
            nonlocal drops
            # Ack after apply: every entry of the batch is still pending when the target gets it.
            held: Any = admin.xpending_range(stream_name, "g", records[0].entry_id, records[-1].entry_id, 10_000)
            unacked.append({e["message_id"].decode() for e in held} >= {r.entry_id for r in records})
            failed = loader.apply(records)
            if records[0].seq % 7 == 1 and drops < 6:  # the next read is in flight, this batch's ack not sent
                drops += 1
                for entry in admin.client_list():
                    if entry.get("name") == name:
                        admin.client_kill_filter(_id=entry["id"])
            return failed

        tally = consume(consumer, apply, ENTITIES, Settings(batch_size=40, claim_idle=60, read_ahead=read_ahead),
                        once=True)
        loader.close()
        consumer.close()
        assert drops >= 3 and len(unacked) >= total // 40 and all(unacked)
        assert [orjson.loads(line)["strawseq"] for path in sorted(tmp_path.glob("*.jsonl"))
                for line in path.read_bytes().splitlines()] == list(range(1, total + 1))
        assert tally.dead_letters == 0 and admin.xpending(stream_name, "g")["pending"] == 0
    finally:
        client.close()
        admin.close()


def test_a_target_down_longer_than_the_health_check_interval_costs_no_redelivery(
    redis_url: str, stream_name: str
) -> None:
    """While the target is down, the read ahead's reply waits unread on the held connection; the ack sent after
    must not run redis-py's health check (a PING whose reply would be that one): no spurious bus outage, so
    the applied batch is not delivered again."""
    client = redis.Redis.from_url(redis_url, health_check_interval=1)
    try:
        xadd_events(client, stream_name, [("upserted", order_data(n)) for n in range(1, 10)])
        seen: list[int] = []
        down_until = [0.0]

        def apply(records: Sequence[Record]) -> Sequence[Failed]:
            if records[0].seq == 1 and not down_until[0]:
                down_until[0] = time.monotonic() + 1.5  # longer than the health check interval
            if time.monotonic() < down_until[0]:
                raise TargetDown("disk full")
            seen.extend(r.seq for r in records)
            return []

        tally = consume(member(client, stream_name, claim_idle=60), apply, ENTITIES, PIPELINED, once=True)
        assert seen == list(range(1, 10)) and tally.applied == 9  # each once: no batch came back
        assert client.xpending(stream_name, "g")["pending"] == 0
    finally:
        client.close()


def test_a_backlog_over_two_streams_is_acked_per_stream(redis_client: redis.Redis, stream_name: str) -> None:
    """One XREADGROUP over two streams gives each stream's entries as a run: each run's XACK names its stream."""
    other = f"{stream_name}.b"
    xadd_events(redis_client, stream_name, [("upserted", order_data(n)) for n in range(1, 12)])
    xadd_events(redis_client, other, [("upserted", order_data(n)) for n in range(1, 8)])
    consumer = RedisConsumer(redis_client, [stream_name, other], "g", "m1", claim_idle=60,
                             dead_letters=lambda s: f"{s}.dlq")
    seen: list[tuple[str, int]] = []
    tally = consume(consumer, each(lambda r: seen.append((r.stream, r.seq))), ENTITIES,
                    Settings(batch_size=4, claim_idle=60, read_ahead="pipelined"), once=True)
    assert sorted(seen) == sorted([(stream_name, n) for n in range(1, 12)] + [(other, n) for n in range(1, 8)])
    assert [seq for stream, seq in seen if stream == other] == list(range(1, 8))
    assert tally.applied == 18
    assert redis_client.xpending(stream_name, "g")["pending"] == 0 and redis_client.xpending(other, "g")["pending"] == 0


def test_an_adopting_member_takes_every_pending_entry_first_in_stream_order(
    redis_client: redis.Redis, stream_name: str
) -> None:
    """A JSON Lines loader restarted under another name: what the old member held comes before anything newer,
    without waiting `claim_idle` and without a delivery counted for it."""
    xadd_events(redis_client, stream_name, [("upserted", order_data(n)) for n in range(1, 11)])
    old = member(redis_client, stream_name, claim_idle=60, name="old-run")
    assert [d.fields["seq"] for d in old.read(4, 0)] == ["1", "2", "3", "4"]
    other = member(redis_client, stream_name, claim_idle=60, name="other-host")
    assert [d.fields["seq"] for d in other.read(3, 0)] == ["5", "6", "7"]
    plain = member(redis_client, stream_name, claim_idle=60, name="plain")
    assert [d.fields["seq"] for d in plain.read(10, 0)] == ["8", "9", "10"]  # no adoption: the others wait
    xadd_events(redis_client, stream_name, [("upserted", order_data(n)) for n in range(11, 13)], first_seq=11)
    adopting = RedisConsumer(redis_client, [stream_name], "g", "new-run", claim_idle=60,
                             dead_letters=lambda s: f"{s}.dlq", adopt=True)
    first = adopting.read(100, 0)
    assert [d.fields["seq"] for d in first] == [str(n) for n in range(1, 11)]
    # Delivered to the old run, then to this one, as after a restart under the same name; adopting (JUSTID)
    # counts no delivery of its own.
    assert {d.deliveries for d in first} == {2}
    adopting.ack(first)
    assert [d.fields["seq"] for d in adopting.read(100, 0)] == ["11", "12"]
    pending: Any = redis_client.xpending(stream_name, "g")
    assert pending["pending"] == 2 and pending["consumers"] == [{"name": b"new-run", "pending": 2}]
