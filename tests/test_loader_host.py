"""A loader host: the far end of the queue, with a file of entities and loaders and no sources. `straw load`
runs there, `straw run` says in one line that there is nothing to poll, and `straw check` reaches each
loader's target (one line each, the password never shown, nothing created)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
import yaml
from sqlalchemy import create_engine, text

from fixtures.legacy_orders import ORDER_ENTITY
from straw.config_load import ConfigError, load_config
from tests.loader_helpers import order_data, xadd_events
from tests.test_cli import invoke


def host_config(directory: Path, redis_url: str, loaders: list[dict[str, Any]]) -> Path:
    path = directory / "straw.yaml"
    path.write_text(yaml.safe_dump({"instance": "dwh", "redis": {"url": redis_url},
                                    "entities": {"order": ORDER_ENTITY}, "loaders": loaders}, sort_keys=False))
    path.chmod(0o600)
    return path


def test_a_loader_host_needs_no_sources_loads_and_refuses_to_run(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    xadd_events(redis_client, stream_name, [("upserted", order_data(n)) for n in range(1, 21)])
    config = host_config(tmp_path, redis_url, [
        {"name": "wh", "kind": "sql", "url": "sqlite:///target.db", "streams": [stream_name], "create_tables": True}])
    loaded = invoke("load", "wh", "--once", "-c", str(config))
    assert loaded.exit_code == 0, loaded.output
    with sqlite3.connect(tmp_path / "target.db") as db:
        assert db.execute('SELECT count(*) FROM "order"').fetchone() == (20,)
    ran = invoke("run", "--once", "-c", str(config))
    assert ran.exit_code == 1
    assert ran.output.strip().splitlines() == [
        "error no sources in this file: `straw run` polls sources; its loaders run with `straw load NAME` (wh)"]
    looked = invoke("dead-letters", "-c", str(config))
    assert looked.exit_code == 1 and len(looked.output.strip().splitlines()) == 1, looked.output
    assert "no sources in this file, so no outbox here" in looked.output
    status = invoke("status", "--json", "-c", str(config))
    assert status.exit_code == 0, status.output
    assert orjson.loads(status.output) == {"loaders": [{
        "loader": "wh", "stream": stream_name, "applied_seq": 20, "newest_seq": 20, "lag": 0, "dead_letters": 0,
        "error": None}]}
    table = invoke("status", "-c", str(config))
    assert table.exit_code == 0 and "loaders" in table.output and stream_name in table.output, table.output
    assert not (tmp_path / "var").exists(), "no outbox is made on a loader host"
    shown = invoke("stream", "-c", str(config), "--count", "1")
    assert shown.exit_code == 0, shown.output
    assert f"{stream_name}: 20 entries (newest 1)" in shown.output, "the loaders' streams are this file's streams"


def test_a_file_with_neither_sources_nor_loaders_is_one_line_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "straw.yaml"
    path.write_text(yaml.safe_dump({"entities": {"order": ORDER_ENTITY}}))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    [problem] = [str(p) for p in caught.value.problems]
    assert problem.startswith(f"{path}:") and "nothing to run" in problem, problem


def test_check_reaches_each_loaders_target_names_what_fails_and_creates_nothing(
    tmp_path: Path, redis_url: str, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DWH_PASSWORD", "pw-4d1f9e")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    good = {"name": "pg", "kind": "sql", "url": pg_url, "streams": ["s"]}
    config = host_config(tmp_path, redis_url, [
        good,
        {"name": "nobody", "kind": "sql", "url": "postgresql+psycopg://nobody_straw:${DWH_PASSWORD}@127.0.0.1/x",
         "streams": ["s"]},
        {"name": "lite", "kind": "sql", "url": "sqlite:///later/target.db", "streams": ["s"]},
        {"name": "files", "kind": "jsonl", "directory": "a-file/out", "streams": ["s"]},
        {"name": "drop", "kind": "jsonl", "directory": "drop", "streams": ["s"]},
    ])
    checked = invoke("check", "-c", str(config))
    lines = checked.output.splitlines()
    assert checked.exit_code == 1, checked.output
    assert "pw-4d1f9e" not in checked.output
    by_loader = {line.split(":")[0]: line for line in lines if " loader " in line}
    assert by_loader["warn loader pg"].endswith(
        "no table order and create_tables is off: a record of its entity stops the loader (create it, or set "
        "create_tables: true)"), by_loader
    assert "nothing applied yet (no straw_applied table)" in by_loader["warn loader pg"]
    assert 'role "nobody_straw" does not exist' in by_loader["FAIL loader nobody"]
    later = tmp_path / "later"
    assert by_loader["ok   loader lite"] == (
        f"ok   loader lite: SQLite {later / 'target.db'} not created yet; {later} (not created yet; {tmp_path} is "
        "writable)")
    assert f"{blocker} is not a folder" in by_loader["FAIL loader files"]
    drop = tmp_path / "drop"
    assert by_loader["ok   loader drop"] == f"ok   loader drop: {drop} (not created yet; {tmp_path} is writable)"
    assert not (tmp_path / "later").exists() and not (tmp_path / "drop").exists(), "a check creates nothing"
    assert not (tmp_path / "var").exists()

    engine = create_engine(pg_url)
    with engine.begin() as conn:
        conn.execute(text('CREATE TABLE "order" (order_no integer PRIMARY KEY)'))
    engine.dispose()
    config = host_config(tmp_path, redis_url, [good])
    checked = invoke("check", "-c", str(config))
    assert checked.exit_code == 0, checked.output
    [line] = [line for line in checked.output.splitlines() if " loader " in line]
    assert line.startswith("ok   loader pg: postgresql 1"), line
    assert line.endswith("nothing applied yet (no straw_applied table)"), line
