"""The JSON Lines loader: rotation by size and day, temporary names, fsync, no line twice after a crash."""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path

import orjson
import pytest
import redis

from loaders.jsonl import DirectoryBusy, JsonlLoader
from loaders.service import run_loader
from straw.config_load import load_config
from straw.config_loaders import JsonlLoaderSpec
from tests.loader_helpers import loader_config, order_data, xadd_events


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
    assert got["a"] == [f'{{"id":"a-{n}",  "data":{{"order_no":{n}}}{suffix.format("a", n)}'.encode()
                        for n in (1, 2, 3, 1, 4)]  # as on the stream, spaces kept: not re-encoded
    assert got["b"][:1] == [f'{{"id":"b-1",  "data":{{"order_no":1}}{suffix.format("b", 1)}'.encode()]
    # A raw text not starting with its brace is re-encoded from the parsed event; trailing blanks are dropped.
    assert [orjson.loads(line)["strawseq"] for line in got["b"]] == [1, 2, 3]
    assert orjson.loads(got["b"][1])["id"] == "b-2" and got["b"][2] == b'{"id":"b-3"' + suffix.format("b", 3).encode()
