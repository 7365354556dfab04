"""The relay's protocol at its edges, against real Redis and real outbox files.

A crash between the atomic publish in Redis and the local mark, a replacement
outbox, a stale one, a checkpoint moved by another writer, two relays racing,
and Redis Cluster's one-slot rule.
Twin outboxes (same identity) are made with SQLite's backup API: what a file
copy, a restored snapshot or a failover by copying the outbox produces.
"""

from __future__ import annotations

import sqlite3
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, insert

from adapters.db import position
from bus.redis import RedisBus, checkpoint_key, hash_tag, read_checkpoint
from fixtures.legacy_orders import create_orders, order_rows
from outbox.relay import Relay, SplitBrain, adopt_streams, run_relay
from outbox.store import Outbox
from straw.local_redis import free_port, redis_server_binary
from straw.records import UPSERTED, encode_event, event_id, observed_now, source_uri
from tests.helpers import orders_config, read_stream, run_once

SOURCE = "orders"
SOURCE_URI = source_uri("test", SOURCE)

OpenOutbox = Callable[[str], Outbox]


@pytest.fixture
def open_outbox(tmp_path: Path) -> Iterator[OpenOutbox]:
    """Outbox files of this test by name; all closed afterwards."""
    opened: list[Outbox] = []

    def open_(name: str) -> Outbox:
        opened.append(Outbox(tmp_path / f"{name}.db"))
        return opened[-1]

    yield open_
    for outbox in opened:
        outbox.close()


def pos(n: int) -> str:
    return position.encode((n,))


def add_records(outbox: Outbox, stream: str, numbers: range) -> None:
    """What a poll of orders `numbers` commits: their records and the source's new position."""
    events = [
        (pos(n), encode_event(source=SOURCE_URI, entity="order", op=UPSERTED, key=str(n), position=pos(n),
                              time=observed_now(), data={"order_no": n}))
        for n in numbers
    ]
    outbox.append(SOURCE, stream, events, [], pos(numbers[-1]), len(numbers))


def twin(outbox: Outbox, open_outbox: OpenOutbox, name: str) -> Outbox:
    """A consistent copy of `outbox` (same identity, records and marks), opened as `name`."""
    target = sqlite3.connect(outbox.path.with_name(f"{name}.db"))
    outbox.db.backup(target)
    target.close()
    return open_outbox(name)


def drain(relay: Relay, stream: str) -> int:
    published = 0
    while True:
        result = relay.publish(stream)
        published += result.published
        if not result.more:
            return published


def stream_seqs(client: redis.Redis, stream: str) -> list[int]:
    return [e["seq"] for e in read_stream(client, stream)]


def stream_orders(client: redis.Redis, stream: str) -> list[int]:
    return [int(e["event"]["subject"]) for e in read_stream(client, stream)]


def test_a_crash_after_the_redis_write_before_the_local_mark_is_reconciled_not_resent(
    redis_client: redis.Redis, stream_name: str, open_outbox: OpenOutbox
) -> None:
    outbox = open_outbox("live")
    adopt_streams(RedisBus(redis_client), outbox, [stream_name])
    add_records(outbox, stream_name, range(1, 251))
    before_publish = twin(outbox, open_outbox, "before-publish")

    assert Relay(RedisBus(redis_client), outbox, batch_size=100).publish(stream_name).published == 100
    assert stream_seqs(redis_client, stream_name) == list(range(1, 101))

    # Restart from the file as it was before mark_published: Redis has 1..100, the outbox does not know.
    restarted = before_publish
    assert (restarted.published_seq(stream_name), restarted.backlog()) == (0, 250)
    relay = Relay(RedisBus(redis_client), restarted, batch_size=100)
    first = relay.publish(stream_name)
    assert first.published == 200, "100 reconciled with the checkpoint plus 100 newly sent"
    assert drain(relay, stream_name) == 50
    assert stream_seqs(redis_client, stream_name) == list(range(1, 251))
    assert stream_orders(redis_client, stream_name) == list(range(1, 251))
    (state,) = restarted.sources()
    assert (state.rows_published, restarted.backlog()) == (250, 0)


def test_a_replacement_outbox_continues_the_stream_from_its_checkpoint(
    redis_client: redis.Redis, stream_name: str, open_outbox: OpenOutbox
) -> None:
    old = open_outbox("old-host")
    adopt_streams(RedisBus(redis_client), old, [stream_name])
    add_records(old, stream_name, range(1, 31))
    drain(Relay(RedisBus(redis_client), old, batch_size=20), stream_name)
    ckpt = read_checkpoint(redis_client, stream_name)
    assert (ckpt.seq, ckpt.outbox, ckpt.positions) == (30, old.identity, {SOURCE: pos(30)})

    new = open_outbox("new-host")
    adopt_streams(RedisBus(redis_client), new, [stream_name])
    assert new.published_seq(stream_name) == 30
    assert new.position(SOURCE) == pos(30), "the new host must poll on from where the stream stands"
    add_records(new, stream_name, range(31, 41))
    assert [r.seq for r in new.pending(stream_name, 0, 100)] == list(range(31, 41))
    drain(Relay(RedisBus(redis_client), new), stream_name)

    assert stream_seqs(redis_client, stream_name) == list(range(1, 41))
    assert stream_orders(redis_client, stream_name) == list(range(1, 41))
    assert read_checkpoint(redis_client, stream_name).outbox == new.identity
    adopt_streams(RedisBus(redis_client), new, [stream_name])  # a second adopt changes nothing
    assert new.published_seq(stream_name) == 40


def test_failover_to_a_fresh_outbox_file_loses_and_repeats_no_row(
    tmp_path: Path, sqlite_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    engine = create_engine(sqlite_url)
    table = create_orders(engine, 60)
    config = orders_config(tmp_path, db_url=sqlite_url, redis_url=redis_url, stream=stream_name, batch_size=25)
    assert run_once(config).errors == []
    for leftover in tmp_path.glob("outbox.db*"):
        leftover.unlink()  # the host is gone; its replacement starts with an empty outbox
    with engine.begin() as conn:
        conn.execute(insert(table), order_rows(20, first=61))
    engine.dispose()

    result = run_once(config)
    assert (result.errors, result.rows_read) == ([], 20)
    entries = read_stream(redis_client, stream_name)
    assert [int(e["event"]["subject"]) for e in entries] == list(range(1, 81))
    assert [e["event"]["id"] for e in entries] == [event_id(SOURCE_URI, str(n), pos(n)) for n in range(1, 81)]
    seqs = [e["seq"] for e in entries]
    assert seqs == sorted(set(seqs))


def test_a_stale_outbox_with_records_below_the_checkpoint_raises_split_brain(
    redis_url: str, redis_client: redis.Redis, stream_name: str, open_outbox: OpenOutbox
) -> None:
    active, stale = open_outbox("active"), open_outbox("stale")
    adopt_streams(RedisBus(redis_client), active, [stream_name])
    adopt_streams(RedisBus(redis_client), stale, [stream_name])  # both saw an empty checkpoint: both start at seq 1
    add_records(active, stream_name, range(1, 6))
    drain(Relay(RedisBus(redis_client), active), stream_name)
    add_records(stale, stream_name, range(1, 4))

    with pytest.raises(SplitBrain, match="two straw instances"):
        Relay(RedisBus(redis_client), stale).publish(stream_name)
    assert stream_seqs(redis_client, stream_name) == [1, 2, 3, 4, 5]
    assert read_checkpoint(redis_client, stream_name).outbox == active.identity
    assert stale.backlog() == 3, "the stale outbox keeps its records for the operator"

    # The relay loop stops on it too, and says why in the outbox (`straw status` shows it).
    with pytest.raises(SplitBrain):
        run_relay(lambda: RedisBus(redis.Redis.from_url(redis_url)), stale, [stream_name], stop=threading.Event())
    (state,) = stale.streams()
    assert state.error is not None and "two straw instances" in state.error
    assert len(read_stream(redis_client, stream_name)) == 5


def test_a_checkpoint_moved_by_another_writer_is_re_read_never_overwritten(
    redis_url: str, redis_client: redis.Redis, stream_name: str, open_outbox: OpenOutbox
) -> None:
    outbox = open_outbox("a")
    adopt_streams(RedisBus(redis_client), outbox, [stream_name])
    add_records(outbox, stream_name, range(1, 301))
    relay = Relay(RedisBus(redis_client), outbox, batch_size=100)
    relay.publish(stream_name)
    copy = twin(outbox, open_outbox, "copy")
    other = redis.Redis.from_url(redis_url)
    try:
        # Another writer (a twin with the same identity, on its own connection) publishes 101..200.
        assert Relay(RedisBus(other), copy, batch_size=100).publish(stream_name).published == 100
    finally:
        other.close()

    # The relay's own view of the checkpoint is now stale: its next write must not land on top.
    relay.publish(stream_name)
    seqs = stream_seqs(redis_client, stream_name)
    assert seqs == list(range(1, len(seqs) + 1)), "101..200 were sent a second time"
    drain(relay, stream_name)
    assert stream_seqs(redis_client, stream_name) == list(range(1, 301))
    assert stream_orders(redis_client, stream_name) == list(range(1, 301))
    (state,) = outbox.sources()
    assert (state.rows_published, outbox.backlog()) == (300, 0)
    assert drain(Relay(RedisBus(redis_client), copy), stream_name) == 100  # the twin only reconciles
    assert len(read_stream(redis_client, stream_name)) == 300


def test_two_relays_racing_on_twin_outboxes_publish_each_record_once(
    redis_url: str, redis_client: redis.Redis, stream_name: str, open_outbox: OpenOutbox
) -> None:
    first = open_outbox("first")
    adopt_streams(RedisBus(redis_client), first, [stream_name])
    for start in range(1, 2001, 100):
        add_records(first, stream_name, range(start, start + 100))
    second = twin(first, open_outbox, "second")
    refused: Counter[str] = Counter()
    failures: list[BaseException] = []

    def race(name: str, outbox: Outbox) -> None:
        client = redis.Redis.from_url(redis_url)
        relay = Relay(RedisBus(client), outbox, batch_size=50)
        try:
            while outbox.backlog():
                result = relay.publish(stream_name)
                refused[name] += result.published == 0  # the other one moved the checkpoint first
        except BaseException as exc:
            failures.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=race, args=(n, o)) for n, o in (("first", first), ("second", second))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    print("rounds that lost the race:", dict(refused))
    assert failures == []
    assert stream_seqs(redis_client, stream_name) == list(range(1, 2001))
    assert stream_orders(redis_client, stream_name) == list(range(1, 2001))


# --- Redis Cluster: the MULTI holds the stream and its checkpoint, so both must share a slot ---

# A tag is reused, a plain name becomes the tag. (A name with braces but no tag, such as `a{}b`,
# can share a slot with no other key; the configuration refuses it, and every brace it finds odd.)
NAMES = ["orders", "erp.orders", "test.0af3.orders", "{shop-1}.orders", "erp.{orders}", "erp.{orders}.v2",
         "a{b}c{d}", "{{x}}"]


@pytest.mark.parametrize("stream", NAMES)
def test_checkpoint_key_hashes_to_the_stream_slot(stream: str) -> None:
    assert redis.crc.key_slot(checkpoint_key(stream).encode()) == redis.crc.key_slot(stream.encode())


def start_cluster_node(binary: str, directory: Path) -> tuple[subprocess.Popen[bytes], redis.Redis]:
    # The cluster bus listens on port + 10000, so the port must be at most 55535.
    port = next(p for p in iter(free_port, None) if p <= 55535)
    server = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
         "--cluster-config-file", str(directory / f"nodes-{port}.conf"), "--dir", str(directory), "--save", "",
         "--logfile", str(directory / "redis.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1)
    deadline = time.monotonic() + 10
    while server.poll() is None and time.monotonic() < deadline:
        try:
            client.ping()
            return server, client
        except redis.ConnectionError:
            time.sleep(0.02)
    server.kill()
    server.wait()
    raise RuntimeError(f"cluster-mode redis-server on port {port} did not start; see {directory / 'redis.log'}")


@pytest.fixture(scope="module")
def cluster_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis.Redis]:
    """A one-node Redis Cluster owning every slot: it refuses a MULTI that spans two slots."""
    binary = redis_server_binary()
    if binary is None:
        pytest.skip("no redis-server binary for a cluster-mode node")
    directory = tmp_path_factory.mktemp("cluster")
    try:
        server, client = start_cluster_node(binary, directory)
    except RuntimeError:  # the free port was taken meanwhile by someone else: once more
        server, client = start_cluster_node(binary, directory)
    try:
        client.execute_command("CLUSTER", "ADDSLOTS", *range(16384))
        deadline = time.monotonic() + 20
        while b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
            assert time.monotonic() < deadline, "the one-node cluster never reached state ok"
            time.sleep(0.05)
        yield client
    finally:
        client.close()
        server.kill()
        server.wait()


def test_hash_tag_is_what_the_cluster_hashes_on(cluster_node: redis.Redis) -> None:
    # An empty `{}` makes Redis hash the whole key, even with a tag after it; a stray `}` is just a character.
    keys = ["erp.orders", "erp.{orders}", "{erp}.orders", "a{b}c{d}", "{{x}}", "a{}b{c}", "{}x{y}", "a}b{c}", "a{b"]
    tags = [hash_tag(key) for key in keys]
    assert tags == [None, "orders", "erp", "b", "{x", None, None, "c", None]
    for key, tag in zip(keys, tags, strict=True):
        slot = cluster_node.execute_command("CLUSTER", "KEYSLOT", key)
        assert cluster_node.execute_command("CLUSTER", "KEYSLOT", key if tag is None else tag) == slot, key


@pytest.mark.parametrize("stream", ["erp.orders", "{shop-1}.orders", "erp.{orders}"])
def test_a_cluster_node_accepts_the_relay_transaction(
    stream: str, cluster_node: redis.Redis, open_outbox: OpenOutbox
) -> None:
    slot = cluster_node.execute_command("CLUSTER", "KEYSLOT", stream)
    assert cluster_node.execute_command("CLUSTER", "KEYSLOT", checkpoint_key(stream)) == slot
    # The node enforces the rule: the same MULTI with the checkpoint in another slot is refused.
    elsewhere = "straw:ckpt:" + stream.replace("{", "").replace("}", "")
    assert cluster_node.execute_command("CLUSTER", "KEYSLOT", elsewhere) != slot
    with cluster_node.pipeline(transaction=True) as pipe:
        pipe.xadd(stream, {"probe": 1})
        pipe.hset(elsewhere, "seq", 0)
        with pytest.raises(redis.ResponseError, match="same slot"):
            pipe.execute()

    outbox = open_outbox("cluster")
    adopt_streams(RedisBus(cluster_node), outbox, [stream])
    add_records(outbox, stream, range(1, 11))
    assert drain(Relay(RedisBus(cluster_node), outbox, batch_size=4), stream) == 10
    assert stream_seqs(cluster_node, stream) == list(range(1, 11))
    cluster_node.delete(stream, checkpoint_key(stream))


def test_a_stream_with_a_hash_tag_shares_its_slot_with_the_users_keys_on_a_cluster(
    tmp_path: Path, sqlite_url: str, cluster_node: redis.Redis
) -> None:
    """What a tag in the stream name is for: a loader's own `{shop-7}` keys in one MULTI with the stream."""
    stream, mine = "legacy.{shop-7}.orders", "{shop-7}:loaded"
    engine = create_engine(sqlite_url)
    create_orders(engine, 30)
    engine.dispose()
    node = cluster_node.connection_pool.connection_kwargs
    url = f"redis://{node['host']}:{node['port']}/0"
    config = orders_config(tmp_path, db_url=sqlite_url, redis_url=url, stream=stream, batch_size=10,
                           relay_batch_size=7)
    try:
        assert run_once(config).errors == []
        entries = read_stream(cluster_node, stream)
        assert [e["event"]["subject"] for e in entries] == [str(n) for n in range(1, 31)]
        ckpt = read_checkpoint(cluster_node, stream)
        assert (ckpt.seq, ckpt.positions) == (30, {SOURCE: pos(30)})
        slots = {cluster_node.execute_command("CLUSTER", "KEYSLOT", k) for k in (stream, checkpoint_key(stream), mine)}
        assert len(slots) == 1
        with cluster_node.pipeline(transaction=True) as pipe:
            pipe.xrange(stream, count=1)
            pipe.set(mine, entries[-1]["entry_id"])
            first, stored = pipe.execute()
        assert (first[0][0].decode(), stored) == (entries[0]["entry_id"], True)
    finally:
        cluster_node.delete(stream, checkpoint_key(stream), mine)
