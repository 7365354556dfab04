"""`straw status` of the loaders: applied seq from the target, newest seq from the bus, lag and dead letters;
it only looks (a torn last line a crash left is not cut, a SQLite target not created), and a target or bus
that cannot be reached is a cell, not a failure of the command."""

from __future__ import annotations

import subprocess
from pathlib import Path

import orjson
import redis
import yaml

from fixtures.legacy_orders import ORDER_ENTITY
from straw.local_redis import RedisServer
from straw.records import encode_event
from tests.crashes import REPO, straw_command
from tests.loader_helpers import SOURCE, order_data, xadd_events
from tests.test_cli import invoke


def host_config(directory: Path, redis_url: str, loaders: list[dict[str, object]]) -> Path:
    path = directory / "straw.yaml"
    path.write_text(yaml.safe_dump({"redis": {"url": redis_url}, "entities": {"order": ORDER_ENTITY},
                                    "loaders": loaders}, sort_keys=False))
    return path


def rows(config: Path) -> dict[str, dict[str, object]]:
    shown = invoke("status", "--json", "-c", str(config))
    assert shown.exit_code == 0, shown.output
    return {row["loader"]: row for row in orjson.loads(shown.output)["loaders"]}


def test_status_shows_applied_newest_lag_and_dead_letters_and_only_looks(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    out = tmp_path / "out"
    config = host_config(tmp_path, redis_url, [
        {"name": "jl", "kind": "jsonl", "streams": [stream_name], "directory": str(out), "max_deliveries": 1},
        {"name": "lite", "kind": "sql", "url": f"sqlite:///{tmp_path / 'never.db'}", "streams": [stream_name]}])
    xadd_events(redis_client, stream_name, [("upserted", order_data(n)) for n in range(1, 5)])
    poison = encode_event(source=SOURCE, entity="invoice", op="upserted", key="1", position="[5]",
                          time="2026-11-29T10:00:00Z", data={"invoice_no": 1})
    redis_client.xadd(stream_name, {"seq": 5, "pos": "[5]", "event": poison})
    xadd_events(redis_client, stream_name, [("upserted", order_data(n)) for n in range(6, 11)], first_seq=6)
    loaded = subprocess.run(straw_command(config, "load", "jl", "--once"), cwd=REPO, capture_output=True, timeout=120)
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr
    xadd_events(redis_client, stream_name, [("upserted", order_data(n)) for n in range(11, 16)], first_seq=11)
    [written] = list(out.glob("*.jsonl*"))
    with written.open("ab") as torn:  # a crash mid-line
        torn.write(b'{"strawseq": 11, "half')
    size = written.stat().st_size

    found = rows(config)
    assert found["jl"] == {"loader": "jl", "stream": stream_name, "applied_seq": 10, "newest_seq": 15, "lag": 5,
                           "dead_letters": 1, "error": None}
    assert found["lite"]["applied_seq"] == 0 and found["lite"]["lag"] == 15 and found["lite"]["error"] is None
    assert written.stat().st_size == size, "status cut a torn line: only the loader may, holding the directory"
    assert not (tmp_path / "never.db").exists(), "status created a SQLite target"

    # `straw dlq retry` sends the dead letter back to the stream with its old seq 5: the newest is still 15.
    [(dead_entry, _fields)] = redis_client.xrange(f"{stream_name}.dlq")
    retried = invoke("dlq", "retry", f"{stream_name}.dlq:{dead_entry.decode()}", "-c", str(config))
    assert retried.exit_code == 0, retried.output
    assert int(redis_client.xrevrange(stream_name, count=1)[0][1][b"seq"]) == 5
    assert rows(config)["jl"]["newest_seq"] == 15


def test_an_unreachable_target_or_bus_is_a_cell_not_a_failure(tmp_path: Path, private_redis: RedisServer) -> None:
    xadd_events(redis.Redis.from_url(private_redis.url), "s", [("upserted", order_data(n)) for n in range(1, 4)])
    config = host_config(tmp_path, private_redis.url, [
        {"name": "pg", "kind": "sql", "url": "postgresql+psycopg://straw@127.0.0.1:1/none", "streams": ["s"]}])
    found = rows(config)["pg"]
    assert found["applied_seq"] is None and found["lag"] is None and found["newest_seq"] == 3
    assert str(found["error"]).startswith("target unreachable (OperationalError: connection failed"), found
    private_redis.kill()
    found = rows(config)["pg"]
    assert found["newest_seq"] is None and found["dead_letters"] is None
    assert "bus unreachable" in str(found["error"]) and "target unreachable" in str(found["error"]), found
    table = invoke("status", "-c", str(config))
    assert table.exit_code == 0 and "bus unreachable" in table.output, table.output
