"""The relay's protocol on NATS JetStream, against the machine's nats-server and real outbox files.

The same edges as tests/test_relay.py (a crash between the publish and the local
mark, a replacement outbox, a stale one, a checkpoint moved by another writer),
plus what is NATS's own: a batch cut short (another subject's publisher in the
same JetStream stream, a deduplicated message) stores a gap-free prefix and is
reconciled; a stale publisher is refused by the server; positions survive any
text as headers; the JetStream stream is created, extended or bound to.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bus.names import subject_problem
from bus.nats import CONTENT_TYPE, JetStreamOptions, covers, event_id
from bus.nats_connect import connect_once
from bus.seam import BusDown, BusRefused, Checkpoint, Outgoing
from fixtures.private_nats import delete_jetstream
from outbox.relay import Relay, SplitBrain, adopt_streams, run_relay
from outbox.store import Outbox
from straw.records import UPSERTED, encode_event, observed_now, source_uri
from tests.nats_support import (
    OpenBus,
    buses,
    jetstream,
    nats_url,
    private_nats_for_session,
    read_messages,
    read_subject,
    subject,
)
from tests.test_relay import SOURCE, OpenOutbox, add_records, drain, open_outbox, pos, twin

# fixtures, imported for pytest
__all__ = ["buses", "jetstream", "nats_url", "open_outbox", "private_nats_for_session", "subject"]


def seqs(url: str, options: JetStreamOptions, subject: str) -> list[int]:
    return [e["seq"] for e in read_subject(url, options.stream, subject)]


def orders(url: str, options: JetStreamOptions, subject: str) -> list[int]:
    return [int(e["event"]["subject"]) for e in read_subject(url, options.stream, subject)]


def test_a_crash_after_the_publish_before_the_local_mark_is_reconciled_not_resent(
    buses: OpenBus, nats_url: str, jetstream: JetStreamOptions, subject: str, open_outbox: OpenOutbox
) -> None:
    bus = buses(nats_url, jetstream)
    outbox = open_outbox("live")
    adopt_streams(bus, outbox, [subject])
    add_records(outbox, subject, range(1, 251))
    before_publish = twin(outbox, open_outbox, "before-publish")

    assert Relay(bus, outbox, batch_size=100).publish(subject).published == 100
    assert seqs(nats_url, jetstream, subject) == list(range(1, 101))
    bus.close()

    restarted = before_publish  # the file as it was before mark_published: the bus has 1..100, it does not know
    relay = Relay(buses(nats_url, jetstream), restarted, batch_size=100)
    assert relay.publish(subject).published == 200, "100 reconciled with the subject's last message plus 100 sent"
    assert drain(relay, subject) == 50
    assert seqs(nats_url, jetstream, subject) == list(range(1, 251))
    assert orders(nats_url, jetstream, subject) == list(range(1, 251))
    (state,) = restarted.sources()
    assert (state.rows_published, restarted.backlog()) == (250, 0)
    relay.bus.close()


def test_a_replacement_outbox_continues_the_subject_from_its_last_message(
    buses: OpenBus, nats_url: str, jetstream: JetStreamOptions, subject: str, open_outbox: OpenOutbox
) -> None:
    bus = buses(nats_url, jetstream)
    old = open_outbox("old-host")
    adopt_streams(bus, old, [subject])
    add_records(old, subject, range(1, 31))
    drain(Relay(bus, old, batch_size=20), subject)
    bus.close()

    fresh = buses(nats_url, jetstream)
    ckpt = fresh.checkpoint(subject)
    assert (ckpt.seq, ckpt.outbox, ckpt.positions) == (30, old.identity, {SOURCE: pos(30)})
    new = open_outbox("new-host")
    adopt_streams(fresh, new, [subject])
    assert (new.published_seq(subject), new.position(SOURCE)) == (30, pos(30))
    add_records(new, subject, range(31, 41))
    drain(Relay(fresh, new), subject)
    assert seqs(nats_url, jetstream, subject) == list(range(1, 41))
    assert orders(nats_url, jetstream, subject) == list(range(1, 41))
    assert fresh.checkpoint(subject).outbox == new.identity
    assert fresh.length(subject) == 40
    assert [p.seq for p in fresh.newest(subject, 3)] == [38, 39, 40]
    fresh.close()


def test_a_stale_outbox_with_records_below_the_checkpoint_raises_split_brain(
    buses: OpenBus, nats_url: str, jetstream: JetStreamOptions, subject: str, open_outbox: OpenOutbox
) -> None:
    bus = buses(nats_url, jetstream)
    active, stale = open_outbox("active"), open_outbox("stale")
    adopt_streams(bus, active, [subject])
    adopt_streams(bus, stale, [subject])  # both saw an empty subject: both start at seq 1
    add_records(active, subject, range(1, 6))
    drain(Relay(bus, active), subject)
    add_records(stale, subject, range(1, 4))

    with pytest.raises(SplitBrain, match="two straw instances"):
        Relay(buses(nats_url, jetstream), stale).publish(subject)
    with pytest.raises(SplitBrain):
        run_relay(lambda: buses(nats_url, jetstream), stale, [subject], stop=threading.Event())
    assert seqs(nats_url, jetstream, subject) == [1, 2, 3, 4, 5]
    assert stale.backlog() == 3, "the stale outbox keeps its records for the operator"
    bus.close()


@pytest.mark.parametrize("same_events", [False, True], ids=["other-events", "same-events"])
def test_a_stale_publisher_is_refused_by_the_server(
    buses: OpenBus, nats_url: str, jetstream: JetStreamOptions, subject: str, same_events: bool
) -> None:
    """Two buses saw the same checkpoint; the second to publish is refused and stores nothing new."""
    first, second = buses(nats_url, jetstream), buses(nats_url, jetstream)
    assert first.checkpoint(subject) == second.checkpoint(subject) == Checkpoint()
    mine = [Outgoing(n, SOURCE, pos(n), event(n)) for n in range(1, 6)]
    theirs = mine if same_events else [Outgoing(n, SOURCE, pos(n), event(n, "stale")) for n in range(1, 6)]

    moved = first.publish(subject, Checkpoint(), mine, "outbox-a")
    assert moved is not None and moved.seq == 5
    assert second.publish(subject, Checkpoint(), theirs, "outbox-b") is None
    stored = read_subject(nats_url, jetstream.stream, subject)
    assert [(e["seq"], e["headers"]["Straw-Outbox"]) for e in stored] == [(n, "outbox-a") for n in range(1, 6)]
    assert second.checkpoint(subject) == moved  # what the relay reconciles with
    first.close()
    second.close()


def event(n: int, tag: str = "") -> bytes:
    return f'{{"specversion":"1.0","id":"{tag}{n:032d}","source":"t","type":"t","subject":"{n}"}}'.encode()


def test_a_batch_cut_by_a_deduplicated_message_stores_a_gap_free_prefix(
    buses: OpenBus, nats_url: str, jetstream: JetStreamOptions, subject: str
) -> None:
    bus = buses(nats_url, jetstream)
    done = bus.publish(subject, Checkpoint(), [Outgoing(n, SOURCE, pos(n), event(n)) for n in (1, 2)], "o")
    assert done is not None
    # Seq 4 repeats event 1's id: the server drops it as a duplicate (it is not the last message, so its id
    # fences nothing); 5 and 6 expect 4's id as the last stored and are refused: nothing after the cut lands.
    batch = [Outgoing(3, SOURCE, pos(3), event(3)), Outgoing(4, SOURCE, pos(4), event(1)),
             Outgoing(5, SOURCE, pos(5), event(5)), Outgoing(6, SOURCE, pos(6), event(6))]
    assert bus.publish(subject, done, batch, "o") is None
    assert seqs(nats_url, jetstream, subject) == [1, 2, 3]
    assert bus.checkpoint(subject) == Checkpoint(3, "o", {SOURCE: pos(3)})
    bus.close()


def test_two_relays_on_two_subjects_of_one_jetstream_stream_cut_each_others_batches_and_lose_nothing(
    buses: OpenBus, nats_url: str, jetstream: JetStreamOptions, subject: str, open_outbox: OpenOutbox
) -> None:
    """The msg-id chain of one relay's batch breaks whenever the other's message lands between: each
    round then stores a prefix and the relay goes on from the subject's last message."""
    subjects = [subject, f"{jetstream.stream}.invoices"]
    outboxes = {s: open_outbox(s) for s in subjects}
    for name, outbox in outboxes.items():
        adopt_streams(buses(nats_url, jetstream), outbox, [name])
        add_source_records(outbox, name, range(1, 1001))
    errors: list[BaseException] = []

    def relay(name: str) -> None:
        bus = buses(nats_url, jetstream)
        try:
            drain_all(Relay(bus, outboxes[name], batch_size=100), name)
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            bus.close()

    threads = [threading.Thread(target=relay, args=(s,)) for s in subjects]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors
    for name, outbox in outboxes.items():
        assert seqs(nats_url, jetstream, name) == list(range(1, 1001))
        assert orders(nats_url, jetstream, name) == list(range(1, 1001))
        assert outbox.backlog() == 0


def add_source_records(outbox: Outbox, stream: str, numbers: range) -> None:
    """As tests/test_relay.add_records, from a source of the stream's own (as straw's sources are)."""
    uri = source_uri("test", stream)
    events = [(pos(n), encode_event(source=uri, entity="order", op=UPSERTED, key=str(n), position=pos(n),
                                    time=observed_now(), data={"order_no": n})) for n in numbers]
    outbox.append(stream, stream, events, [], pos(numbers[-1]), len(numbers))


def drain_all(relay: Relay, stream: str) -> None:
    """Until the outbox is empty: a cut batch reports `more` like a full one, or not at all."""
    for _ in range(10_000):
        relay.publish(stream)
        if relay.outbox.backlog() == 0:
            return
    raise AssertionError("the relay made no progress")


position_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=40)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(positions=st.dictionaries(st.from_regex(r"[a-z][a-z0-9_-]{0,10}", fullmatch=True), position_text,
                                 min_size=1, max_size=4))
def test_any_position_text_survives_the_headers(
    buses: OpenBus, nats_url: str, jetstream: JetStreamOptions, subject: str, positions: dict[str, str]
) -> None:
    """Positions are legacy key values (quotes, CR/LF, any script): the checkpoint gives them back exactly."""
    bus = buses(nats_url, jetstream)
    try:
        seen = bus.checkpoint(subject)
        batch = [Outgoing(seen.seq + i + 1, source, text, event(seen.seq + i + 1, "p"))
                 for i, (source, text) in enumerate(positions.items())]
        moved = bus.publish(subject, seen, batch, "o")
        assert moved is not None
        expected = {**seen.positions, **positions}
        assert moved.positions == expected
        assert buses(nats_url, jetstream).checkpoint(subject) == Checkpoint(batch[-1].seq, "o", expected)
    finally:
        bus.close()


def test_the_jetstream_stream_is_created_extended_or_bound_to(
    buses: OpenBus, nats_url: str, jetstream: JetStreamOptions, subject: str
) -> None:
    bus = buses(nats_url, jetstream, maxlen=1000)
    invoices = f"{jetstream.stream}.invoices"
    bus.checkpoint(subject)
    bus.checkpoint(invoices)  # straw made the stream, so it may add the subject
    info = asyncio.run(stream_info(nats_url, jetstream.stream))
    assert info["subjects"] == [subject, invoices]
    assert (info["storage"], info["max_msgs_per_subject"], info["duplicate_window"]) == ("file", 1000, 120e9)
    bus.close()

    operators = JetStreamOptions(stream=jetstream.stream + "_ops")
    shop = f"{operators.stream}.shop"
    asyncio.run(add_stream(nats_url, operators.stream, [f"{shop}.>"]))
    try:
        bound = buses(nats_url, operators)
        assert bound.publish(f"{shop}.orders", Checkpoint(), [Outgoing(1, SOURCE, pos(1), event(1))], "o")
        with pytest.raises(BusRefused, match=r"does not take subject '.*\.orders' \(its subjects: .*shop.>\); add"):
            bound.checkpoint(subject)  # not straw's stream: never changed behind the operator's back
        bound.close()
        clash = buses(nats_url, JetStreamOptions(stream=jetstream.stream + "_clash"))
        with pytest.raises(BusRefused, match=r"belongs to another JetStream stream; set bus\.jetstream\.stream"):
            clash.checkpoint(f"{shop}.orders")
        clash.close()
    finally:
        delete_jetstream(nats_url, operators.stream)


async def stream_info(url: str, name: str) -> dict[str, object]:
    nc = await connect_once(url, timeout=5)
    try:
        info = await nc.jetstream().stream_info(name)
        storage = str(getattr(info.config.storage, "value", info.config.storage))
        return {"subjects": info.config.subjects, "storage": storage,
                "max_msgs_per_subject": info.config.max_msgs_per_subject,
                "duplicate_window": info.config.duplicate_window * 1e9 if info.config.duplicate_window else None}
    finally:
        await nc.close()


async def add_stream(url: str, name: str, subjects: list[str]) -> None:
    nc = await connect_once(url, timeout=5)
    try:
        await nc.jetstream().add_stream(name=name, subjects=subjects)
    finally:
        await nc.close()


def test_messages_are_structured_cloudevents_with_dedup_id_and_straw_headers(
    buses: OpenBus, nats_url: str, jetstream: JetStreamOptions, subject: str, open_outbox: OpenOutbox
) -> None:
    bus = buses(nats_url, jetstream)
    outbox = open_outbox("o")
    adopt_streams(bus, outbox, [subject])
    add_records(outbox, subject, range(1, 4))
    drain(Relay(bus, outbox), subject)
    bus.close()
    (first, *_rest) = read_messages(nats_url, jetstream.stream, subject)
    headers = first.headers or {}
    assert headers["Content-Type"] == CONTENT_TYPE
    assert headers["Nats-Msg-Id"] == orders_event(first.data)["id"]
    assert (headers["Straw-Seq"], headers["Straw-Outbox"]) == ("1", outbox.identity)
    assert not any(k.lower().startswith("ce-") for k in headers), "structured mode: no binary-mode headers"


def orders_event(data: bytes | None) -> dict[str, object]:
    import orjson

    parsed: dict[str, object] = orjson.loads(data or b"")
    return parsed


def test_wrong_credentials_are_refused_in_one_line_without_the_password(buses: OpenBus, tmp_path: Path) -> None:
    from fixtures.private_nats import nats_server_binary, start_private_nats

    if nats_server_binary() is None:
        pytest.skip("no nats-server binary (apt-get install nats-server)")
    server = start_private_nats(tmp_path / "nats", user="straw", password="right-horse")
    try:
        wrong = server.url.replace("right-horse", "wrong-battery")
        bus = buses(wrong, JetStreamOptions(stream="s"), socket_timeout=3)
        with pytest.raises(BusRefused) as refused:
            bus.checkpoint("erp.orders")
        message = str(refused.value)
        assert "authentication failed" in message and "bus.url" in message
        assert "wrong-battery" not in message and "\n" not in message
        bus.close()
        good = buses(server.url, JetStreamOptions(stream="s"), socket_timeout=3)
        assert good.checkpoint("erp.orders") == Checkpoint()
        good.close()
    finally:
        server.kill()


def test_a_user_without_publish_permission_is_refused_in_one_line(buses: OpenBus, tmp_path: Path) -> None:
    """The server answers a forbidden publish with an asynchronous -ERR and no ack: the wait that follows
    ends in the operator's line, not in endless retries."""
    from fixtures.private_nats import nats_server_binary, start_private_nats

    if nats_server_binary() is None:
        pytest.skip("no nats-server binary (apt-get install nats-server)")
    rules = ('authorization { users = [ {user: straw, password: pw-1234, permissions: '
             '{publish: {allow: ["$JS.API.>", "_INBOX.>"]}, subscribe: {allow: ["_INBOX.>"]}}} ] }\n')
    server = start_private_nats(tmp_path / "nats", config=rules)
    try:
        url = f"nats://straw:pw-1234@127.0.0.1:{server.port}"
        bus = buses(url, JetStreamOptions(stream="s"), socket_timeout=1)
        assert bus.checkpoint("erp.orders") == Checkpoint()  # the JetStream API is allowed
        with pytest.raises(BusRefused, match=r"NATS authorization failed \(.*permissions violation.*erp\.orders"):
            bus.publish("erp.orders", Checkpoint(), [Outgoing(1, SOURCE, pos(1), event(1))], "o")
    finally:
        server.kill()


def test_a_server_that_is_down_is_bus_down_and_a_new_bus_carries_on(buses: OpenBus, tmp_path: Path) -> None:
    from fixtures.private_nats import nats_server_binary, start_private_nats

    if nats_server_binary() is None:
        pytest.skip("no nats-server binary (apt-get install nats-server)")
    server = start_private_nats(tmp_path / "nats")
    options = JetStreamOptions(stream="s")
    try:
        bus = buses(server.url, options, socket_timeout=2)
        assert bus.publish("erp.orders", Checkpoint(), [Outgoing(1, SOURCE, pos(1), event(1))], "o") is not None
        server.kill()
        with pytest.raises(BusDown, match=r"nats unreachable|connection lost"):
            bus.publish("erp.orders", Checkpoint(1, "o"), [Outgoing(2, SOURCE, pos(2), event(2))], "o")
        bus.close()
        down = buses(server.url, options, socket_timeout=2)
        with pytest.raises(BusDown, match=r"ConnectionRefusedError"):  # said at once, not a timeout
            down.checkpoint("erp.orders")
        down.close()
        server.start()  # same port, same store
        again = buses(server.url, options, socket_timeout=2)
        assert again.checkpoint("erp.orders") == Checkpoint(1, "o", {SOURCE: pos(1)})
        again.close()
    finally:
        server.kill()


@pytest.mark.parametrize(
    ("name", "fits"),
    [("erp.orders", True), ("erp.{orders}", True), ("orders", True), ("erp.", False), ("erp..orders", False)],
)
def test_which_stream_names_nats_can_take_as_subjects(name: str, fits: bool) -> None:
    assert (subject_problem(name) is None) is fits


@pytest.mark.parametrize(
    ("pattern", "subject", "taken"),
    [("erp.orders", "erp.orders", True), ("erp.*", "erp.orders", True), ("erp.>", "erp.orders.v2", True),
     ("erp.*", "erp.orders.v2", False), ("erp.>", "erp", False), (">", "x", True), ("erp.orders", "erp", False)],
)
def test_a_stream_subject_filter_takes_what_nats_would(pattern: str, subject: str, taken: bool) -> None:
    assert covers(pattern, subject) is taken


def test_the_dedup_id_is_the_cloudevent_id_however_the_event_is_spelled() -> None:
    assert event_id(event(7)) == f"{7:032d}"  # straw's own encoding: sliced
    assert event_id(b'{"type":"t","id":"a\\"b","specversion":"1.0"}') == 'a"b'  # any other JSON: parsed
