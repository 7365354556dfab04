"""The relay's protocol on RabbitMQ Streams, against the machine's RabbitMQ (its stream plugin, port 5552).

The same edges as tests/test_relay.py: a crash between the publish and the local mark, a twin outbox (a
copied file) resending, a replacement outbox on another host continuing from the stream's tail, the stale
one it replaced refused, a publish against a checkpoint that moved. Then what a consumer sees (the official
CloudEvents SDK parses every body) and what an operator sees (one line for a wrong password, a closed port,
a name RabbitMQ cannot take).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from cloudevents.core.formats.json import JSONFormat
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine

from bus.rabbitmq import RabbitStreamBus, Target, body_of, checkpoint_of, producer_name, properties_of
from bus.seam import BusDown, BusRefused, Checkpoint, Outgoing
from fixtures.legacy_orders import create_orders
from outbox.relay import Relay, SplitBrain, adopt_streams
from outbox.store import Outbox
from straw.config_load import ConfigError, load_config
from straw.local_redis import free_port
from tests.helpers import run_once
from tests.rabbit_helpers import rabbit_config, read_rabbit_stream
from tests.test_cli import invoke

# The relay tests' own records, twins and drains: both buses are held to one standard.
from tests.test_relay import SOURCE, SOURCE_URI, OpenOutbox, add_records, drain, pos, twin


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


def published(bus: RabbitStreamBus, stream: str, outbox: Outbox, numbers: range, batch_size: int = 1000) -> None:
    """Adopt `stream`, add the records of orders `numbers`, publish them all."""
    adopt_streams(bus, outbox, [stream])
    add_records(outbox, stream, numbers)
    drain(Relay(bus, outbox, batch_size=batch_size), stream)


def seqs(bus: RabbitStreamBus, stream: str) -> list[int]:
    return [int(properties_of(m)["seq"]) for m in bus.read_all(stream)]


def orders(bus: RabbitStreamBus, stream: str) -> list[int]:
    return [int(JSONFormat().read(None, body_of(m)).get_subject() or 0) for m in bus.read_all(stream)]


def test_a_crash_after_the_publish_before_the_local_mark_is_reconciled_not_resent(
    rabbitmq_bus: RabbitStreamBus, rabbitmq_stream: str, open_outbox: OpenOutbox
) -> None:
    stream, bus = rabbitmq_stream, rabbitmq_bus
    outbox = open_outbox("live")
    adopt_streams(bus, outbox, [stream])
    add_records(outbox, stream, range(1, 251))
    before_publish = twin(outbox, open_outbox, "before-publish")

    assert Relay(bus, outbox, batch_size=100).publish(stream).published == 100
    assert seqs(bus, stream) == list(range(1, 101))

    restarted = before_publish  # the file as it was before mark_published: the stream has 1..100
    assert (restarted.published_seq(stream), restarted.backlog()) == (0, 250)
    relay = Relay(RabbitStreamBus(bus.url), restarted, batch_size=100)
    assert relay.publish(stream).published == 200, "100 reconciled with the stream's tail plus 100 newly sent"
    assert drain(relay, stream) == 50
    assert seqs(bus, stream) == list(range(1, 251))
    assert orders(bus, stream) == list(range(1, 251))
    assert (restarted.sources()[0].rows_published, restarted.backlog()) == (250, 0)
    relay.bus.close()


def test_a_twin_outbox_resending_what_is_on_the_stream_is_dropped_by_the_broker(
    rabbitmq_bus: RabbitStreamBus, rabbitmq_stream: str, open_outbox: OpenOutbox
) -> None:
    """The copy has the same identity, so the same producer name: the broker's deduplication drops every
    record whose seq is not above the producer's last, even when the relay's own check is bypassed."""
    stream, bus = rabbitmq_stream, rabbitmq_bus
    outbox = open_outbox("live")
    adopt_streams(bus, outbox, [stream])
    add_records(outbox, stream, range(1, 61))
    copy = twin(outbox, open_outbox, "copy")
    drain(Relay(bus, outbox, batch_size=25), stream)
    tail = bus.checkpoint(stream)
    assert (tail.seq, tail.outbox, tail.positions) == (60, outbox.identity, {SOURCE: pos(60)})

    # The copy publishes its (identical) records 1..60 against the checkpoint it finds, as a racing twin would.
    batch = [Outgoing(r.seq, r.source, r.position, r.event) for r in copy.pending(stream, 0, 100)]
    assert bus.publish(stream, tail, batch, copy.identity) == Checkpoint(60, copy.identity, {SOURCE: pos(60)})
    assert seqs(bus, stream) == list(range(1, 61)), "the broker kept each publishing id once"
    assert bus.length(stream) == 60


def test_a_replacement_outbox_continues_from_the_tail_and_the_stale_one_is_refused(
    rabbitmq_bus: RabbitStreamBus, rabbitmq_stream: str, open_outbox: OpenOutbox
) -> None:
    stream, bus = rabbitmq_stream, rabbitmq_bus
    old = open_outbox("old-host")
    published(bus, stream, old, range(1, 31), batch_size=20)
    add_records(old, stream, range(31, 36))  # polled, never published: the host died

    new = open_outbox("new-host")  # another host: another identity, so another producer name
    other = RabbitStreamBus(bus.url)
    adopt_streams(other, new, [stream])
    assert new.published_seq(stream) == 30
    assert new.position(SOURCE) == pos(30), "the new host polls on from where the stream stands"
    add_records(new, stream, range(31, 41))
    drain(Relay(other, new), stream)
    assert seqs(bus, stream) == list(range(1, 41))
    assert orders(bus, stream) == list(range(1, 41))
    assert bus.checkpoint(stream).outbox == new.identity

    # The old host comes back with its five unpublished records: refused, nothing sent.
    with pytest.raises(SplitBrain, match="two straw instances publish to this stream"):
        Relay(bus, old).publish(stream)
    assert seqs(bus, stream) == list(range(1, 41))
    other.close()


def test_a_publish_against_a_checkpoint_that_moved_sends_nothing(
    rabbitmq_bus: RabbitStreamBus, rabbitmq_stream: str, open_outbox: OpenOutbox
) -> None:
    stream, bus = rabbitmq_stream, rabbitmq_bus
    first = open_outbox("first")
    published(bus, stream, first, range(1, 11))
    record = Outgoing(11, SOURCE, pos(11), b"{}")
    for stale in (Checkpoint(), Checkpoint(5, first.identity), Checkpoint(10, "someone-else")):
        assert bus.publish(stream, stale, [record], "a-second-outbox") is None
    assert seqs(bus, stream) == list(range(1, 11))


def test_every_message_is_a_cloudevent_the_official_sdk_parses_with_seq_and_pos_as_properties(
    rabbitmq_bus: RabbitStreamBus, rabbitmq_stream: str, open_outbox: OpenOutbox
) -> None:
    stream, bus = rabbitmq_stream, rabbitmq_bus
    outbox = open_outbox("live")
    published(bus, stream, outbox, range(1, 21), batch_size=7)
    messages = bus.read_all(stream)
    assert len(messages) == 20
    for n, message in enumerate(messages, 1):
        event = JSONFormat().read(None, body_of(message))  # structured mode: the body is the whole event
        assert (event.get_type(), event.get_source(), event.get_subject()) == ("order.upserted", SOURCE_URI, str(n))
        assert event.get_data() == {"order_no": n}
        props = properties_of(message)
        assert (props["seq"], props["pos"], props["source"], props["outbox"]) == (n, pos(n), SOURCE, outbox.identity)
        assert message.properties.content_type in (b"application/cloudevents+json", "application/cloudevents+json")
        assert checkpoint_of(message) == Checkpoint(n, outbox.identity, {SOURCE: pos(n)})
    newest = bus.newest(stream, 3)
    assert [(p.seq, JSONFormat().read(None, p.event).get_subject()) for p in newest] == [
        (18, "18"), (19, "19"), (20, "20")]


def test_the_producer_name_is_the_outbox_identity_and_the_broker_knows_its_last_id(
    rabbitmq_bus: RabbitStreamBus, rabbitmq_stream: str, open_outbox: OpenOutbox
) -> None:
    stream, bus = rabbitmq_stream, rabbitmq_bus
    outbox = open_outbox("live")
    published(bus, stream, outbox, range(1, 8))
    assert producer_name(outbox.identity) == f"straw.{outbox.identity}"
    assert bus.last_publishing_id(stream, outbox.identity) == 7
    assert bus.last_publishing_id(stream, "never-published") == 0


def test_a_wrong_password_is_final_and_one_line_without_the_password(rabbitmq_url: str) -> None:
    bus = RabbitStreamBus(rabbitmq_url.replace("guest:guest@", "guest:not-the-S3cret@"))
    try:
        with pytest.raises(BusRefused) as caught:
            bus.checkpoint("test.whatever")
    finally:
        bus.close()
    message = str(caught.value)
    assert "authentication failed" in message and "\n" not in message
    assert "not-the-S3cret" not in message


def test_a_closed_stream_port_is_bus_down_and_says_to_enable_the_plugin() -> None:
    bus = RabbitStreamBus(f"rabbitmq-stream://guest:guest@127.0.0.1:{free_port()}/", socket_timeout=3.0)
    try:
        with pytest.raises(BusDown, match="rabbitmq_stream"):
            bus.checkpoint("test.whatever")
    finally:
        bus.close()


@pytest.mark.parametrize(("stream", "says"), [("amq.orders", "amq."), ("x" * 256, "255 bytes")])
def test_a_stream_name_rabbitmq_cannot_take_is_one_config_line(
    tmp_path: Path, stream: str, says: str
) -> None:
    config = tmp_path / "straw.yaml"
    config.write_text(yaml.safe_dump({
        "bus": {"url": "rabbitmq-stream://guest:guest@127.0.0.1:5552/"},
        "entities": {"order": {"key": ["order_no"], "fields": {"order_no": "integer"}}},
        "sources": [{"name": "orders", "url": "sqlite:///x.db", "table": "T", "mode": "incrementing",
                     "incrementing_column": "ID", "entity": "order", "stream": stream}],
    }))
    (tmp_path / "x.db").touch()
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    lines = str(caught.value).strip().splitlines()
    assert any("sources[0].stream" in line and says in line and "RabbitMQ" in line for line in lines), lines


def test_run_check_status_and_stream_speak_rabbitmq_through_the_cli(
    tmp_path: Path, sqlite_url: str, rabbitmq_url: str, rabbitmq_bus: RabbitStreamBus, rabbitmq_stream: str
) -> None:
    engine = create_engine(sqlite_url)
    create_orders(engine, 30)
    engine.dispose()
    config = str(rabbit_config(tmp_path, db_url=sqlite_url, bus_url=rabbitmq_url, stream=rabbitmq_stream))
    # In-process Runner as the other tests use it (`invoke("run")` would leave the runner's cached loggers
    # pointing at the CLI runner's closed stderr for every later test of the session).
    assert run_once(Path(config)).errors == []
    assert [int(e["event"]["subject"]) for e in read_rabbit_stream(rabbitmq_bus, rabbitmq_stream)] == list(
        range(1, 31))

    checked = invoke("check", "--config", config)
    assert checked.exit_code == 0, checked.output
    assert "ok   rabbitmq: RabbitMQ 3." in checked.output and "redis" not in checked.output
    status = invoke("status", "--json", "--config", config)
    assert status.exit_code == 0, status.output
    (row,) = yaml.safe_load(status.stdout)["streams"]
    assert (row["length"], row["published_seq"], row["backlog"]) == (30, 30, 0)
    assert row["checkpoint"] == f"tail of {rabbitmq_stream}"
    shown = invoke("stream", "--count", "2", "--config", config)
    assert shown.exit_code == 0, shown.output
    rows = [line.split("│")[1:4] for line in shown.output.splitlines() if "order.upserted" in line]
    assert [[cell.strip() for cell in row] for row in rows] == [["28", "29", "order.upserted"],
                                                                 ["29", "30", "order.upserted"]], shown.output

    wrong = rabbit_config(tmp_path, db_url=sqlite_url, bus_url=rabbitmq_url.replace(":guest@", ":wrong-pw@"),
                          stream=rabbitmq_stream)
    refused = invoke("check", "--config", str(wrong))
    assert refused.exit_code == 1
    assert "rabbitmq" in refused.output and "authentication failed" in refused.output
    assert "wrong-pw" not in refused.output


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=st.lists(st.tuples(st.sampled_from(["orders", "ORDERS-2", "ünïcode.src", "a" * 200]),
                                  st.text(max_size=300), st.binary(max_size=2000)), min_size=1, max_size=20))
def test_hostile_positions_sources_and_bodies_come_back_as_they_went(
    rabbitmq_bus: RabbitStreamBus, rabbitmq_stream: str, records: list[tuple[str, str, bytes]]
) -> None:
    """Whatever text a position holds (quotes, NULs, surrogates-free unicode, JSON look-alikes) and whatever
    bytes an event is, the bus returns them unchanged, and the checkpoint holds each source's last position."""
    stream, bus = rabbitmq_stream, rabbitmq_bus
    seen = bus.checkpoint(stream)
    batch = [Outgoing(seen.seq + i, source, pos_, body) for i, (source, pos_, body) in enumerate(records, 1)]
    moved = bus.publish(stream, seen, batch, "hostile-outbox")
    expected = {**seen.positions, **{source: pos_ for _, source, pos_, _ in batch}}
    assert moved == Checkpoint(batch[-1].seq, "hostile-outbox", expected)
    assert bus.checkpoint(stream) == moved
    back = bus.newest(stream, len(batch))
    assert [(p.seq, p.event) for p in back] == [(r.seq, r.event) for r in batch]


def test_two_relays_racing_on_twin_outboxes_publish_each_record_once(
    rabbitmq_url: str, rabbitmq_bus: RabbitStreamBus, rabbitmq_stream: str, open_outbox: OpenOutbox
) -> None:
    """Twins share the producer name: whatever slips between one's tail read and its write, the broker's
    deduplication drops. Each relay on its own connection, as two hosts would be."""
    stream = rabbitmq_stream
    first = open_outbox("first")
    adopt_streams(rabbitmq_bus, first, [stream])
    for start in range(1, 1001, 100):
        add_records(first, stream, range(start, start + 100))
    second = twin(first, open_outbox, "second")
    refused: Counter[str] = Counter()
    failures: list[BaseException] = []

    def race(name: str, outbox: Outbox) -> None:
        bus = RabbitStreamBus(rabbitmq_url)
        relay = Relay(bus, outbox, batch_size=50)
        try:
            while outbox.backlog():
                refused[name] += relay.publish(stream).published == 0  # the other one moved the tail first
        except BaseException as exc:
            failures.append(exc)
        finally:
            bus.close()

    threads = [threading.Thread(target=race, args=(n, o)) for n, o in (("first", first), ("second", second))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    print("rounds that lost the race:", dict(refused))
    assert failures == []
    assert seqs(rabbitmq_bus, stream) == list(range(1, 1001))
    assert orders(rabbitmq_bus, stream) == list(range(1, 1001))


def test_an_event_larger_than_the_brokers_frame_is_refused_with_the_fix_not_retried_forever(
    rabbitmq_bus: RabbitStreamBus, rabbitmq_stream: str
) -> None:
    huge = Outgoing(1, SOURCE, pos(1), b'{"data":"' + b"x" * 1_100_000 + b'"}')
    with pytest.raises(BusRefused, match=r"stream\.frame_max"):
        rabbitmq_bus.publish(rabbitmq_stream, Checkpoint(), [huge], "big-rows")
    assert rabbitmq_bus.length(rabbitmq_stream) == 0


@pytest.mark.parametrize(("url", "expected"), [
    ("rabbitmq-stream://h/", ("h", 5552, "/", "guest", False, False)),
    ("rabbitmq-stream://straw:p%40ss%2Fword@rabbit.local:5553/%2F", ("rabbit.local", 5553, "/", "straw", False, False)),
    ("rabbitmq-stream+tls://straw:pw@h/erp?load_balancer=true", ("h", 5551, "erp", "straw", True, True)),
])
def test_the_url_names_host_port_vhost_user_and_tls_and_the_password_stays_out_of_reprs(
    url: str, expected: tuple[object, ...]
) -> None:
    target = Target.parse(url)
    assert (target.host, target.port, target.vhost, target.username, target.tls, target.load_balancer) == expected
    assert "p@ss/word" not in repr(target) and "pw" not in repr(target).replace("port", "")
    if "p%40ss" in url:
        assert target.password == "p@ss/word"


def test_a_call_that_swallows_its_cancellation_still_ends_in_a_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """asyncio.wait_for returns only once the call it cancelled stopped; a call that swallows the cancellation
    (seen inside rstream: a restarted loader waited on its subscription for minutes) must not hold its caller."""
    import asyncio

    import bus.rabbitmq as rabbitmq

    monkeypatch.setattr(rabbitmq, "CANCEL_GRACE", 0.5)
    released = threading.Event()

    async def stubborn() -> None:
        while not released.is_set():
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                continue  # what a well-behaved call never does

    loop = rabbitmq.LoopThread()
    try:
        with pytest.raises(TimeoutError, match="did not stop when cancelled"):
            loop.run(stubborn(), 0.2)
        assert loop.run(asyncio.sleep(0, result="still serving"), 1.0) == "still serving"
    finally:
        released.set()
        loop.stop()
