"""Loaders on every bus: the same consume loop, exactly-once apply, dead letters and group sharing on Redis
Streams, NATS JetStream and RabbitMQ Streams (real servers, one stream per test)."""

from __future__ import annotations

import random
import re
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from bus.names import JetStreamOptions
from bus.seam import BusDown
from fixtures.private_nats import NatsServer
from fixtures.private_rabbitmq import PrivateRabbit
from loaders.records import Record
from loaders.repair import StreamBehind
from loaders.sdk import Failed, Settings, Tally, consume
from loaders.service import open_consumer, run_loader
from straw.config_load import load_config
from straw.local_redis import RedisServer
from tests.crashes import REPO, straw_command
from tests.loader_buses import LoaderBus, bus_loader_config, loader_bus
from tests.loader_helpers import jsonl_seqs, load_then_kill, order_data
from tests.nats_support import nats_url, private_nats, private_nats_for_session
from tests.test_cli import invoke
from tests.test_loader_sql import applied_seq, rows

__all__ = ["loader_bus", "nats_url", "private_nats", "private_nats_for_session"]  # fixtures, imported for pytest


def sql_on(tmp_path: Path, bus: LoaderBus, url: str, **extra: Any) -> Path:
    spec = {"name": "wh", "kind": "sql", "url": url, "streams": [bus.stream], "create_tables": True,
            "tables": {"order": "orders"}, "claim_idle": "300ms", "block": "200ms", **extra}
    return bus_loader_config(tmp_path, bus, [spec])


def load_once(config: Path) -> Any:
    loaded = load_config(config)
    return run_loader(loaded, loaded.loaders[0], once=True, stop=threading.Event())


def test_each_record_applied_once_in_order_and_again_only_what_is_new(
    tmp_path: Path, loader_bus: LoaderBus, sqlite_url: str
) -> None:
    config = sql_on(tmp_path, loader_bus, sqlite_url, batch_size=7)
    changes = [("upserted", order_data(n % 13, amount=f"{n}.00")) for n in range(60)]
    last = loader_bus.publish(changes)
    tally = load_once(config)
    assert tally.applied == 60
    found = rows(sqlite_url)
    assert sorted(found) == list(range(13))
    assert {k: str(v["amount"]) for k, v in found.items()} == {n % 13: f"{n}.00" for n in range(47, 60)}
    assert applied_seq(sqlite_url, loader_bus.stream) == last
    assert load_once(config).applied == 0  # acked: nothing is handed out twice
    loader_bus.publish([("deleted", order_data(3)), ("upserted", order_data(99))])
    assert load_once(config).applied == 2
    assert sorted(rows(sqlite_url)) == [n for n in range(13) if n != 3] + [99]
    assert applied_seq(sqlite_url, loader_bus.stream) == last + 2


def poisoned(tmp_path: Path, bus: LoaderBus, pg_url: str, max_deliveries: int, last: int) -> Path:
    """Order 1 applied; then the target's `note` made too short for order 4's, and orders 2..`last` published:
    order 4 (seq 4) fails each time it is applied."""
    config = sql_on(tmp_path, bus, pg_url, max_deliveries=max_deliveries)
    bus.publish([("upserted", order_data(1))])
    load_once(config)
    engine = create_engine(pg_url)
    with engine.begin() as conn:  # the target is stricter than the entity: the record fails each time
        conn.execute(text("ALTER TABLE orders ALTER COLUMN note TYPE varchar(10)"))
    engine.dispose()
    bus.publish([("upserted", order_data(n, note="a long note that does not fit" if n == 4 else None))
                 for n in range(2, last + 1)])
    return config


def test_a_poison_record_goes_to_the_dead_letters_after_n_deliveries_and_the_rest_is_applied(
    tmp_path: Path, loader_bus: LoaderBus, pg_url: str
) -> None:
    config = poisoned(tmp_path, loader_bus, pg_url, 3, last=7)
    tally = load_once(config)
    assert tally.dead_letters == 1
    assert tally.failed == 3  # delivered three times, failed each time, then moved aside
    assert sorted(rows(pg_url)) == [1, 2, 3, 5, 6, 7]
    assert applied_seq(pg_url, loader_bus.stream) == 7
    (dead,) = loader_bus.dead_letters(f"{loader_bus.stream}.dlq")
    assert (dead["seq"], dead["deliveries"], dead["group"]) == ("4", "3", "wh")
    assert "too long" in dead["error"] or "value too long" in dead["error"].lower()
    assert load_once(config).applied == 0  # settled: the poison is not handed out again


def test_two_members_of_one_group_share_the_work_where_the_bus_can(
    tmp_path: Path, loader_bus: LoaderBus, sqlite_url: str
) -> None:
    config = load_config(sql_on(tmp_path, loader_bus, sqlite_url))
    spec = config.loaders[0]
    loader_bus.publish([("upserted", order_data(n)) for n in range(40)])
    one, two = open_consumer(config, spec, "one"), open_consumer(config, spec, "two")
    try:
        first = one.read(10, 2.0)
        second = two.read(10, 2.0)
        if loader_bus.kind == "rabbitmq":  # no single active consumer before 3.11: each reads every record
            assert [d.entry_id for d in first] == [d.entry_id for d in second] == [str(n) for n in range(10)]
            return
        assert first and second
        assert not {d.entry_id for d in first} & {d.entry_id for d in second}
        one.ack(first)
        two.ack(second)
    finally:
        one.close()
        two.close()


def test_dlq_list_show_retry_drop_and_replay_through_the_cli(
    tmp_path: Path, loader_bus: LoaderBus, pg_url: str
) -> None:
    config = poisoned(tmp_path, loader_bus, pg_url, 2, last=6)
    engine = create_engine(pg_url)
    assert load_once(config).dead_letters == 1
    listed = invoke("dlq", "list", "-c", str(config))
    assert listed.exit_code == 0, listed.output
    [item] = re.findall(rf"({re.escape(loader_bus.stream)}\.dlq:[\d-]+)", listed.output)
    shown = invoke("dlq", "show", item, "-c", str(config))
    assert shown.exit_code == 0, shown.output
    assert "value too long" in shown.output and '"order_no":4' in shown.output and "deliveries: 2" in shown.output
    still = invoke("dlq", "retry", item, "-c", str(config))  # not fixed yet: it stays a dead letter
    if loader_bus.kind != "redis":  # applied here: the target refuses it again, and says so
        assert still.exit_code == 1 and "still cannot be applied" in still.output, still.output
        assert invoke("dlq", "show", item, "-c", str(config)).exit_code == 0
    with engine.begin() as conn:  # the operator fixes the target...
        conn.execute(text("ALTER TABLE orders ALTER COLUMN note TYPE text"))
    if loader_bus.kind != "redis":
        retried = invoke("dlq", "retry", item, "-c", str(config))  # ...and sends the record through again
        assert retried.exit_code == 0 and "applied to the target of loader wh" in retried.output, retried.output
    else:
        load_once(config)  # the record sent back by the failed retry above is applied now
    assert rows(pg_url)[4]["note"] == "a long note that does not fit"
    dropped = invoke("dlq", "drop", item, "--yes", "-c", str(config))
    if loader_bus.kind == "rabbitmq":
        assert dropped.exit_code == 1 and "append-only" in dropped.output, dropped.output
    else:  # the retry took it out already
        assert dropped.exit_code == 2 and "no entry" in dropped.output, dropped.output
    with engine.begin() as conn:  # the target restored from an empty backup: replay puts everything back
        for table in ("orders", "straw_versions", "straw_applied"):
            conn.execute(text(f"DROP TABLE {table}"))
    engine.dispose()
    replayed = invoke("replay", "wh", "--from-seq", "3", "-c", str(config))
    assert replayed.exit_code == 0, replayed.output
    assert "replays from seq 3" in replayed.output, replayed.output
    assert sorted(rows(pg_url)) == [3, 4, 5, 6]
    assert applied_seq(pg_url, loader_bus.stream) == 6
    beyond = invoke("replay", "wh", "--from-seq", "99", "-c", str(config))
    assert beyond.exit_code == 1 and "no " in beyond.output and "seq 99" in beyond.output, beyond.output


def test_a_loader_ahead_of_its_bus_waits_until_the_stream_reaches_its_seq(
    tmp_path: Path, loader_bus: LoaderBus, sqlite_url: str
) -> None:
    """What the target holds (applied seq 8) is ahead of the bus (seq 5): nothing is read until the stream
    reaches seq 8 again; then everything after it is applied, the records at or below it skipped."""
    config = load_config(sql_on(tmp_path, loader_bus, sqlite_url))
    spec = config.loaders[0]
    loader_bus.publish([("upserted", order_data(n)) for n in range(1, 6)])
    member = open_consumer(config, spec, "one")
    seen: list[int] = []

    def apply(records: Sequence[Record]) -> list[Failed]:
        seen.extend(r.seq for r in records)
        return []

    try:
        assert member.newest_seq(loader_bus.stream) == 5
        with pytest.raises(StreamBehind, match="applied up to seq 8 but the bus's newest record is seq 5"):
            consume(member, apply, config.entities, Settings(give_up_after=0.5, block=0.2), once=True,
                    applied=lambda stream: 8, streams=[loader_bus.stream])
        assert seen == []  # not one record read while behind
        stop = threading.Event()
        tally: list[Tally] = []
        waiting = threading.Thread(target=lambda: tally.append(consume(
            member, apply, config.entities, Settings(block=0.2), stop=stop, applied=lambda stream: 8,
            streams=[loader_bus.stream])))
        waiting.start()
        time.sleep(1.5)
        assert seen == [] and waiting.is_alive()
        loader_bus.publish([("upserted", order_data(n)) for n in range(6, 11)])  # the repair, and one more
        deadline = time.monotonic() + 30
        while 10 not in seen and time.monotonic() < deadline:
            time.sleep(0.1)
        stop.set()
        waiting.join(30)
        assert seen == list(range(1, 11))  # handed over in order; the SQL loader skips what it has by seq
        assert tally[0].behind == {}
    finally:
        member.close()


def test_sigterm_finishes_the_batch_acks_and_exits_0(tmp_path: Path, loader_bus: LoaderBus, sqlite_url: str) -> None:
    config = sql_on(tmp_path, loader_bus, sqlite_url, batch_size=20)
    loader_bus.publish([("upserted", order_data(n)) for n in range(1, 201)])
    log = tmp_path / "load.log"
    with log.open("wb") as out:
        loader = subprocess.Popen(straw_command(config, "load", "wh"), cwd=REPO, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while applied_or_zero(sqlite_url, loader_bus.stream) < 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    loader.send_signal(signal.SIGTERM)
    assert loader.wait(30) == 0, log.read_text()[-2000:]
    assert "(stopped by signal)" in log.read_text()
    assert load_once(config).applied == 0  # everything it applied was acked before it exited
    assert sorted(rows(sqlite_url)) == list(range(1, 201))


def applied_or_zero(url: str, stream: str) -> int:
    try:
        return applied_seq(url, stream)
    except Exception:  # not created yet
        return 0


@pytest.mark.parametrize("loader_bus", ["redis", "nats"], indirect=True)  # RabbitMQ 3.10: see the README
def test_two_loader_processes_of_one_group_share_the_work_and_apply_each_record_once(
    tmp_path: Path, loader_bus: LoaderBus, pg_url: str
) -> None:
    # claim_idle well above a batch's time: a batch slower than it would be handed to the other member too
    # (applied once all the same, but counted by both)
    config = sql_on(tmp_path, loader_bus, pg_url, batch_size=25, claim_idle="30s")
    loader_bus.publish([("upserted", order_data(1))])  # the stream exists before the members start
    logs = [tmp_path / f"member-{name}.log" for name in ("a", "b")]
    members = []
    for name, log in zip(("a", "b"), logs, strict=True):
        with log.open("wb") as out:
            members.append(subprocess.Popen(straw_command(config, "load", "wh", "--consumer", name), cwd=REPO,
                                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
    try:
        deadline = time.monotonic() + 60  # both up (one applied the first record, the other waits with it)
        while applied_or_zero(pg_url, loader_bus.stream) < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(3.0)
        last = loader_bus.publish([("upserted", order_data(n)) for n in range(2, 1501)])
        deadline = time.monotonic() + 120
        while applied_or_zero(pg_url, loader_bus.stream) < last and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        for member in members:
            member.send_signal(signal.SIGTERM)
        codes = [member.wait(30) for member in members]
    assert codes == [0, 0], [log.read_text()[-1500:] for log in logs]
    counts = [int(re.findall(r"wh: (\d+) applied", log.read_text())[-1]) for log in logs]
    assert all(counts), counts  # both took a share
    assert sum(counts) == last  # and no record went to both
    assert sorted(rows(pg_url)) == list(range(1, 1501))


def outage_mid_load(tmp_path: Path, bus: LoaderBus, sqlite_url: str, server: Any) -> None:
    """Load 400 records; the server stops mid-load and starts again; 50 more: each of the 450 applied once."""
    config = sql_on(tmp_path, bus, sqlite_url, batch_size=20)
    bus.publish([("upserted", order_data(n)) for n in range(1, 401)])
    bus.close()
    bus._bus = None
    log = tmp_path / "load.log"
    with log.open("wb") as out:
        loader = subprocess.Popen(straw_command(config, "load", "wh"), cwd=REPO, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while applied_or_zero(sqlite_url, bus.stream) < 40 and time.monotonic() < deadline:
            time.sleep(0.05)
        server.stop()  # mid-load: a batch in hand fails to ack, the next reads fail
        deadline = time.monotonic() + 60
        while "bus unreachable, retrying" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(2.0)
        assert loader.poll() is None, log.read_text()  # it waits for the bus, it does not exit
        assert "bus unreachable, retrying" in log.read_text()
        server.start()
        deadline = time.monotonic() + 60
        while True:  # a restarted RabbitMQ node answers StreamNotAvailable for a while
            try:
                bus.publish([("upserted", order_data(n)) for n in range(401, 451)])
                break
            except BusDown:
                assert time.monotonic() < deadline, "the bus did not come back"
                bus.close()
                bus._bus = None
                time.sleep(1.0)
        deadline = time.monotonic() + 120
        while applied_or_zero(sqlite_url, bus.stream) < 450 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        loader.send_signal(signal.SIGTERM)
        code = loader.wait(30)
        bus.close()
    assert code == 0, log.read_text()[-2000:]
    assert applied_seq(sqlite_url, bus.stream) == 450
    assert sorted(rows(sqlite_url)) == list(range(1, 451))
    assert load_once(config).applied == 0  # all acked: nothing comes back


def test_a_nats_outage_mid_load_is_waited_out_and_nothing_is_lost_or_doubled(
    tmp_path: Path, private_nats: NatsServer, sqlite_url: str
) -> None:
    bus = LoaderBus("nats", private_nats.url, "outage.orders", JetStreamOptions(stream="straw_outage"))
    outage_mid_load(tmp_path, bus, sqlite_url, private_nats)


@pytest.mark.slow
def test_a_rabbitmq_outage_mid_load_is_waited_out_and_nothing_is_lost_or_doubled(
    tmp_path: Path, private_rabbitmq: PrivateRabbit, sqlite_url: str
) -> None:
    outage_mid_load(tmp_path, LoaderBus("rabbitmq", private_rabbitmq.url, "outage.orders"), sqlite_url,
                    private_rabbitmq)


def test_a_redis_outage_mid_load_is_waited_out_and_nothing_is_lost_or_doubled(
    tmp_path: Path, private_redis: RedisServer, sqlite_url: str
) -> None:
    """With a backlog the loader reads ahead: the outage hits a batch read ahead (dropped, reclaimed) and an ack in
    flight (applied, not acked: skipped when it comes back)."""
    outage_mid_load(tmp_path, LoaderBus("redis", private_redis.url, "outage.orders"), sqlite_url, private_redis)


@pytest.mark.slow
@pytest.mark.parametrize("loader_bus", ["nats", "rabbitmq"], indirect=True)  # Redis: test_loader_pipelined.py
def test_a_jsonl_loader_killed_at_random_writes_each_record_once_and_in_order(
    tmp_path: Path, loader_bus: LoaderBus
) -> None:
    """The JSON Lines loader skips `seq`s already on disk, so it must never write a newer record before one a
    killed run held: on NATS what a killed run pulled is adopted at start (not redelivered after `claim_idle`,
    behind newer ones: seen, "1851 != 1801"); RabbitMQ re-reads from the group's stored offset."""
    total = 8_000
    loader_bus.publish([("upserted", order_data(n)) for n in range(1, total + 1)])
    out = tmp_path / "out"
    # claim_idle far longer than the test: nothing comes back by the server's redelivery alone
    config = bus_loader_config(tmp_path, loader_bus, [{
        "name": "jl", "kind": "jsonl", "streams": [loader_bus.stream], "directory": str(out), "batch_size": 50,
        "claim_idle": "10m", "block": "200ms"}])
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    for _kill in range(6):
        load_then_kill(config, out, tmp_path / "load.log", rng.randrange(50, 800), total)
        lines = jsonl_seqs(out)
        assert lines == list(range(1, len(lines) + 1)), f"not in order or twice (seed {seed})"
    done = subprocess.run(straw_command(config, "load", "jl", "--once"), cwd=REPO, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert jsonl_seqs(out) == list(range(1, total + 1)), f"seed {seed}"
    assert not loader_bus.dead_letters(f"{loader_bus.stream}.dlq")
