"""The JSON Lines loader: rotation by size and day, temporary names, fsync, no line twice after a crash."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import threading
from pathlib import Path

import orjson
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from loaders.jsonl import DirectoryBusy, JsonlLoader, UnreadableFile
from loaders.records import Record
from loaders.sdk import TargetDown
from loaders.service import apply_dead_letter, run_loader
from straw.config_load import load_config
from straw.config_loaders import JsonlLoaderSpec
from straw.records import encode_event
from tests.loader_helpers import SOURCE, loader_config, order_data, xadd_events
from tests.test_outbox_errors import tmpfs


def spec(directory: Path, stream: str, max_bytes: int = 64 * 2**20) -> JsonlLoaderSpec:
    return JsonlLoaderSpec(name="drop", kind="jsonl", streams=[stream], directory=directory, max_bytes=max_bytes)


def lines(directory: Path) -> list[dict[str, object]]:
    return [orjson.loads(line) for path in sorted(directory.glob("*.jsonl")) for line in path.read_bytes().splitlines()]


def test_files_rotate_by_size_and_open_ones_have_a_hidden_temporary_name(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    xadd_events(redis_client, stream_name, [("upserted", order_data(n)) for n in range(1, 41)])
    config = loader_config(tmp_path, redis_url, [{"name": "drop", "kind": "jsonl", "directory": "out",
                                                  "streams": [stream_name], "max_bytes": 4096}], stream_name)
    loaded = load_config(config)
    assert run_loader(loaded, loaded.loaders[0], once=True, stop=threading.Event()).applied == 40
    out = tmp_path / "out"
    today = dt.datetime.now(dt.UTC).date().isoformat()
    names = sorted(p.name for p in out.glob("*.jsonl"))
    assert len(names) > 3 and names[0] == f"{stream_name}-{today}-0001.jsonl"
    assert not list(out.glob("*.part"))  # closed at the end of the run
    assert all(p.stat().st_size <= 4096 for p in out.glob("*.jsonl"))
    got = lines(out)
    assert [line["strawseq"] for line in got] == list(range(1, 41))
    assert got[0]["type"] == "order.upserted" and got[0]["data"]["amount"] == "10.00"  # type: ignore[index]
    from cloudevents.v1.http import from_json

    first_line = sorted(out.glob("*.jsonl"))[0].read_bytes().splitlines()[0]
    event = from_json(first_line)  # each line is a structured-mode CloudEvent, its extensions included
    assert event["strawseq"] == 1 and event["strawstream"] == stream_name and event["subject"] == "1"


def test_a_new_day_starts_a_new_file(tmp_path: Path, redis_client: redis.Redis, stream_name: str) -> None:
    from loaders.sdk import Settings, consume
    from tests.test_loader_sdk import ENTITIES, member

    days = iter([dt.date(2026, 11, 29)] + [dt.date(2026, 11, 30)] * 10)  # asked once per batch
    loader = JsonlLoader(spec(tmp_path, stream_name), today=lambda: next(days))
    xadd_events(redis_client, stream_name, [("upserted", order_data(n)) for n in range(1, 7)])
    consume(member(redis_client, stream_name), loader.apply, ENTITIES, Settings(batch_size=2), once=True)
    part = list(tmp_path.glob(".*.part"))
    assert [p.name for p in part] == [f".{stream_name}-2026-11-30-0001.jsonl.part"]  # still open
    loader.close()
    assert sorted(p.name for p in tmp_path.glob("*.jsonl")) == [
        f"{stream_name}-2026-11-29-0001.jsonl", f"{stream_name}-2026-11-30-0001.jsonl"]


def test_after_a_crash_a_torn_line_is_cut_and_nothing_is_written_twice(
    tmp_path: Path, redis_client: redis.Redis, stream_name: str
) -> None:
    from loaders.sdk import Settings, consume
    from tests.test_loader_sdk import ENTITIES, member

    xadd_events(redis_client, stream_name, [("upserted", order_data(n)) for n in range(1, 6)])
    first = JsonlLoader(spec(tmp_path, stream_name))
    consume(member(redis_client, stream_name), first.apply, ENTITIES, Settings(), once=True)
    first._lock.release()  # the process "died": its file stays open under the temporary name
    [part] = tmp_path.glob(".*.part")
    with part.open("ab") as handle:
        handle.write(b'{"specversion":"1.0","id":"torn')  # a crash in the middle of a line
    redis_client.xgroup_setid(stream_name, "g", "0")  # and every entry is delivered again
    xadd_events(redis_client, stream_name, [("upserted", order_data(6))], first_seq=6)
    second = JsonlLoader(spec(tmp_path, stream_name))
    consume(member(redis_client, stream_name, name="m2"), second.apply, ENTITIES, Settings(), once=True)
    second.close()
    assert [line["strawseq"] for line in lines(tmp_path)] == [1, 2, 3, 4, 5, 6]


def test_two_processes_on_one_directory_are_refused(tmp_path: Path, stream_name: str) -> None:
    first = JsonlLoader(spec(tmp_path, stream_name))
    with pytest.raises(DirectoryBusy, match="in use by another straw load process"):
        JsonlLoader(spec(tmp_path, stream_name))
    first.close()


def test_a_batch_over_two_streams_writes_each_line_as_on_the_stream_and_skips_only_redeliveries(
    tmp_path: Path,
) -> None:
    from loaders.records import Record

    def record(stream: str, seq: int, raw: str | None = None, retry: bool = False) -> Record:
        data: dict[str, object] = {"order_no": seq}
        event: dict[str, object] = {"type": "order.upserted", "id": f"{stream}-{seq}", "data": data}
        text = raw if raw is not None else f'{{"id":"{stream}-{seq}",  "data":{{"order_no":{seq}}}}}'
        return Record(stream, f"{seq}-0", seq, "", f"{stream}-{seq}", "order", "upserted", str(seq), data,
                      event, text, 1, retry)

    loader = JsonlLoader(JsonlLoaderSpec(name="drop", kind="jsonl", streams=["a", "b"], directory=tmp_path))
    loader.apply([record("a", 1), record("a", 2), record("b", 1)])
    # Runs of a stream interleaved, redeliveries of both (a 2, b 1), a retried old record, odd whitespace.
    loader.apply([record("a", 2), record("b", 1), record("a", 3), record("b", 2, raw=' {"id":"b-2"}\n'),
                  record("a", 1, retry=True), record("b", 3, raw='{"id":"b-3"} ')])
    loader.apply([record("a", 3), record("a", 4)])  # the top seq of the last batch counts, retried one or not
    loader.close()
    got = {p.name.split("-")[0]: p.read_bytes().splitlines() for p in tmp_path.glob("*.jsonl")}
    suffix = ',"strawstream":"{}","strawseq":{}}}'
    as_sent = [f'{{"id":"a-{n}",  "data":{{"order_no":{n}}}{suffix.format("a", n)}'.encode() for n in (1, 2, 3, 4)]
    retried = b'{"id":"a-1",  "data":{"order_no":1},"strawstream":"a","strawretry":true,"strawseq":1}'
    assert got["a"] == [*as_sent[:3], retried, as_sent[3]]  # as on the stream, spaces kept: not re-encoded
    assert got["b"][:1] == [f'{{"id":"b-1",  "data":{{"order_no":1}}{suffix.format("b", 1)}'.encode()]
    # A raw text not starting with its brace is re-encoded from the parsed event; trailing blanks are dropped.
    assert [orjson.loads(line)["strawseq"] for line in got["b"]] == [1, 2, 3]
    assert orjson.loads(got["b"][1])["id"] == "b-2" and got["b"][2] == b'{"id":"b-3"' + suffix.format("b", 3).encode()


def _record(stream: str, seq: int, raw: str, event: dict[str, object]) -> Record:
    data = event.get("data")
    return Record(stream, f"{seq}-0", seq, "", f"{stream}-{seq}", "order", "upserted", str(seq),
                  data if isinstance(data, dict) else {}, event, raw, 1, False)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(events=st.lists(st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=5), min_size=1, max_size=6),
       indent=st.sampled_from([None, 1, 2, 4]), newline=st.sampled_from(["\n", "\r\n", "\r"]))
def test_an_event_published_over_several_lines_is_still_one_line_with_its_values(
    tmp_path_factory: pytest.TempPathFactory, events: list[dict[str, object]], indent: int | None, newline: str
) -> None:
    """A producer other than straw (or `redis-cli` by hand) may publish an event pretty-printed: JSON allows CR and
    LF between tokens. The file must still hold one event a line, and the same values."""
    directory = tmp_path_factory.mktemp("pretty")
    records = []
    for seq, event in enumerate(events, start=1):
        text = json.dumps({"id": f"e{seq}", **event}, indent=indent).replace("\n", newline)
        records.append(_record("s", seq, text, orjson.loads(text)))
    loader = JsonlLoader(spec(directory, "s"))
    loader.apply(records[:1])
    loader.apply(records[1:])  # and a batch whose first line is whole, others not
    loader.close()
    [path] = directory.glob("*.jsonl")
    written = path.read_bytes().split(b"\n")
    assert written[-1] == b"" and len(written) == len(events) + 1 and b"\r" not in path.read_bytes()
    for seq, (line, record) in enumerate(zip(written, records, strict=False), start=1):
        assert orjson.loads(line) == {**record.event, "strawstream": "s", "strawseq": seq}


def test_a_torn_line_longer_than_the_tail_read_is_cut_whole_and_a_long_last_line_is_read(tmp_path: Path) -> None:
    """A crash while writing an event larger than the 64 KB read at start: the whole torn line goes, not its last
    64 KB (which left the start of a torn line in the file, and the next line glued to it)."""
    big = "x" * 200_000
    records = [_record("s", n, orjson.dumps({"id": f"e{n}", "data": {"note": big}}).decode(), {}) for n in (1, 2)]
    first = JsonlLoader(spec(tmp_path, "s"))
    first.apply(records)
    first._lock.release()  # killed with its file open
    [part] = tmp_path.glob(".*.part")
    with part.open("ab") as handle:
        handle.write(b'{"id":"e3","data":{"note":"' + b"y" * 150_000)
    second = JsonlLoader(spec(tmp_path, "s"))
    assert second._last == {"s": 2}  # the last whole line, 200 KB long, read back whole
    second.apply([*records, _record("s", 3, '{"id":"e3"}', {})])  # 1 and 2 again: redeliveries, skipped
    second.close()
    assert [line["strawseq"] for line in lines(tmp_path)] == [1, 2, 3]


@pytest.mark.parametrize("last", [b"not json\n", b'["a list"]\n', b'{"strawseq":"7"}\n', b'{"id":"x"}\n'])
def test_a_last_line_the_loader_did_not_write_stops_it_with_the_file_named(tmp_path: Path, last: bytes) -> None:
    (tmp_path / "s-2026-11-29-0001.jsonl").write_bytes(b'{"id":"e1","strawseq":1}\n' + last)
    with pytest.raises(UnreadableFile, match=r"s-2026-11-29-0001\.jsonl: its last line is not an event this loader"):
        JsonlLoader(spec(tmp_path, "s"))


def _sized(seq: int, length: int = 500) -> Record:
    """A record whose line in the file is `length` bytes long."""
    framing = len('{"id":"e","data":{"note":""}}') - 1 + len(',"strawstream":"s","strawseq":}\n')
    pad = length - framing - 2 * len(str(seq))
    raw = orjson.dumps({"id": f"e{seq}", "data": {"note": "x" * pad}}).decode()
    return _record("s", seq, raw, {})


def _fill(disk: Path) -> Path:
    """Every page of the file system taken, by a file of its own."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as handle, contextlib.suppress(OSError):
        while True:
            handle.write(b"\0" * 4096)
    return filler


@pytest.mark.parametrize("records", [30, 3])  # past the write buffer's size, and within it (then in flush())
def test_a_full_disk_is_target_down_with_no_line_half_written_and_the_batch_goes_in_once_space_is_back(
    tmp_path: Path, records: int
) -> None:
    with tmpfs(tmp_path / "disk", "256k") as disk:
        loader = JsonlLoader(spec(disk / "out", "s"))
        loader.apply([_sized(n, 1500) for n in range(1, 11)])
        filler = _fill(disk)
        batch = [_sized(n, 1500) for n in range(11, 11 + records)]
        for _ in range(2):  # the SDK retries the same batch while the disk stays full
            with pytest.raises(TargetDown, match="No space left on device"):
                loader.apply(batch)  # some of it fits in the file's last page, the rest does not
        [part] = (disk / "out").glob(".*.part")
        assert part.read_bytes().endswith(b"\n") and len(part.read_bytes().split(b"\n")) == 11  # 1..10, whole
        filler.unlink()
        loader.apply(batch)
        loader.apply([_sized(n, 1500) for n in range(records + 5, records + 16)])  # some again: skipped
        loader.close()
        assert [line["strawseq"] for line in lines(disk / "out")] == list(range(1, records + 16))


def test_a_batch_that_failed_after_a_file_was_rotated_out_is_not_written_twice(tmp_path: Path) -> None:
    """A batch fills the open file and the loader renames it (closed, fsynced, for good: a job may have taken
    it), then the disk is full for the next file. The retry must skip what went into the renamed one."""
    with tmpfs(tmp_path / "disk", "256k") as disk:
        loader = JsonlLoader(JsonlLoaderSpec(name="drop", kind="jsonl", streams=["s"], directory=disk / "out",
                                             max_bytes=16_000))
        loader.apply([_sized(n) for n in range(1, 31)])  # 15,000 bytes: four pages, room for two more lines
        filler = _fill(disk)
        batch = [_sized(n) for n in range(31, 41)]  # 31 and 32 fill the file, 33 needs a new one: no space
        with pytest.raises(TargetDown, match="No space left on device"):
            loader.apply(batch)
        [done] = (disk / "out").glob("*.jsonl")
        assert [orjson.loads(line)["strawseq"] for line in done.read_bytes().splitlines()][-2:] == [31, 32]
        filler.unlink()
        loader.apply(batch)
        loader.close()
        assert [line["strawseq"] for line in lines(disk / "out")] == list(range(1, 41))


def test_a_retried_dead_letter_as_the_last_line_is_not_taken_for_the_newest_written(tmp_path: Path) -> None:
    first = JsonlLoader(spec(tmp_path, "s"))
    first.apply([_sized(n) for n in range(1, 6)])
    again = _sized(2)
    first.apply([dataclasses.replace(again, retry=True)])  # `straw dlq retry` sent seq 2 again: written, marked
    first._lock.release()  # killed before the ack of 4 and 5
    second = JsonlLoader(spec(tmp_path, "s"))
    second.apply([_sized(n) for n in (4, 5, 6)])  # redelivered, and a new one
    second.close()
    got = [(line["strawseq"], line.get("strawretry")) for line in lines(tmp_path)]
    assert got == [(1, None), (2, None), (3, None), (4, None), (5, None), (2, True), (6, None)]


def test_a_file_left_open_by_a_run_killed_before_midnight_is_renamed_by_the_next_day_s_run(tmp_path: Path) -> None:
    first = JsonlLoader(spec(tmp_path, "s"), today=lambda: dt.date(2026, 11, 29))
    first.apply([_sized(n) for n in range(1, 4)])
    first._lock.release()  # killed at 23:59 with its file open
    second = JsonlLoader(spec(tmp_path, "s"), today=lambda: dt.date(2026, 11, 30))
    second.apply([_sized(n) for n in range(2, 6)])
    assert sorted(p.name for p in tmp_path.glob("*s-*")) == [".s-2026-11-30-0001.jsonl.part", "s-2026-11-29-0001.jsonl"]
    second.close()
    assert [line["strawseq"] for line in lines(tmp_path)] == [1, 2, 3, 4, 5]


def test_a_file_deleted_while_being_written_is_noticed_before_the_ack_and_the_batch_goes_to_a_new_one(
    tmp_path: Path,
) -> None:
    """A cleanup job removes the open `.part`: writes to it would go on, fsynced and acked, into a file nobody
    can see. The loader notices before the ack (the file has no name left), and writes the batch again."""
    loader = JsonlLoader(spec(tmp_path, "s"))
    loader.apply([_sized(n) for n in range(1, 6)])
    [part] = tmp_path.glob(".*.part")
    part.unlink()
    with pytest.raises(TargetDown, match=r"\.s-.*\.jsonl\.part: deleted while being written"):
        loader.apply([_sized(n) for n in range(6, 11)])
    loader.apply([_sized(n) for n in range(6, 11)])  # the SDK's retry of the same batch
    loader.close()
    assert [line["strawseq"] for line in lines(tmp_path)] == list(range(6, 11))


def test_a_file_that_cannot_be_renamed_at_stop_is_a_warning_not_an_error(tmp_path: Path) -> None:
    loader = JsonlLoader(spec(tmp_path, "s"))
    loader.apply([_sized(n) for n in range(1, 4)])
    [part] = tmp_path.glob(".*.part")
    part.unlink()  # gone between the last batch and the stop
    with capture_logs() as logs:
        loader.close()
    [warning] = [entry for entry in logs if entry["event"] == "file not closed"]
    assert warning["log_level"] == "warning" and warning["file"] == str(part) and warning["stream"] == "s"
    JsonlLoader(spec(tmp_path, "s")).close()  # the directory's lock was released all the same


def test_a_dead_letter_applied_here_while_its_jsonl_loader_runs_is_refused_with_what_to_do(tmp_path: Path) -> None:
    """On NATS and RabbitMQ `straw dlq retry` applies a record to the loader's target itself: with the loader
    running, its directory is locked. One line saying so (exit 1), not a traceback; once stopped, applied."""
    loaded = load_config(loader_config(tmp_path, "redis://127.0.0.1:1/0", [
        {"name": "jl", "kind": "jsonl", "streams": ["s"], "directory": str(tmp_path / "out")}]))
    event = encode_event(source=SOURCE, entity="order", op="upserted", key="3", position="[3]",
                         time="2026-11-29T10:00:00Z", data=order_data(3)).decode()
    fields = {"stream": "s", "group": "jl", "entry": "3-0", "seq": "3", "event": event}
    running = JsonlLoader(loaded.loaders[0])  # type: ignore[arg-type]
    said = apply_dead_letter(loaded, fields)
    assert said.startswith("still not applied: loader jl is running on its directory (one process at a time)")
    running.apply([_sized(n) for n in range(1, 6)])
    running.close()
    assert apply_dead_letter(loaded, fields) == "applied to the target of loader jl (seq 3)"
    written = lines(tmp_path / "out")
    assert [(line["strawseq"], line.get("strawretry")) for line in written][-1] == (3, True)
