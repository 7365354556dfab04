"""The outbox's bad days, and the relay's: a full disk, a read-only or damaged outbox, refused
credentials. Each is one line that names the file (or service), what happened and what to do; nothing
already in the outbox is lost; `check` writes nothing."""

from __future__ import annotations

import sqlite3
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest
import redis
import yaml

from straw import redact
from straw.config_load import load_config
from straw.local_redis import RedisServer, free_port
from straw.runner import Runner
from tests.bigtable import assert_each_row_once, big_table, items_config
from tests.crashes import WAITING, straw_command
from tests.test_cli import invoke, lines


@contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A small file system of our own (root only), to fill or make read-only for real."""
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def remount(where: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(where)], check=True)


def straw(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(straw_command(path, *args), capture_output=True, text=True, timeout=120, check=False)


def with_redis(path: Path, url: str) -> Path:
    """The same configuration pointing at another Redis (the outbox stays)."""
    config = yaml.safe_load(path.read_text())
    config["redis"]["url"] = url
    other = path.with_name(f"straw-{uuid.uuid4().hex[:6]}.yaml")
    other.write_text(yaml.safe_dump(config, sort_keys=False))
    return other


def outbox_counts(outbox: Path) -> tuple[int, int]:
    """(records waiting, rows read as the positions table has them) straight from the file."""
    with closing(sqlite3.connect(outbox)) as db:
        waiting = db.execute(WAITING).fetchone()[0]
        read = db.execute("SELECT coalesce(sum(rows_read), 0) FROM positions").fetchone()[0]
    return int(waiting), int(read)


def test_a_full_disk_is_one_line_and_loses_nothing(
    tmp_path: Path, redis_client: redis.Redis, redis_url: str, stream_name: str
) -> None:
    legacy = tmp_path / "legacy.db"
    with tmpfs(tmp_path / "disk", "1m") as disk:
        path = items_config(disk, db_url=big_table(legacy, 10), redis_url=redis_url, stream=stream_name,
                            batch_size=1000)
        assert straw(path, "run", "--once").returncode == 0  # the outbox adopts the stream; 10 published
        big_table(legacy, 50_000, first=11)
        redis_down = with_redis(path, f"redis://127.0.0.1:{free_port()}/0")  # records stay in the outbox

        ran = straw(redis_down, "run", "--once", "--wait", "1")
        assert ran.returncode == 1
        assert "Traceback" not in ran.stderr + ran.stdout
        full = [line for line in lines(ran.stderr) if "the disk is full" in line]
        assert full, ran.stderr
        assert f"outbox {disk / 'outbox.db'}: the disk is full" in full[0]
        assert "nothing already in the outbox is lost: free space" in full[0]
        waiting, read = outbox_counts(disk / "outbox.db")
        assert 0 < waiting == read - 10  # whole batches committed before the disk filled, and kept

        status = invoke("status", "--config", str(redis_down))
        assert status.exit_code == 0, status.output
        assert f"{waiting} records waiting" in status.stdout

        remount(disk, "size=256m")  # space freed
        again = straw(path, "run", "--once")
        assert again.returncode == 0, again.stderr
    assert_each_row_once(redis_client, stream_name, 50_010)


def test_a_read_only_outbox_is_one_line_from_run_and_status(
    tmp_path: Path, redis_client: redis.Redis, redis_url: str, stream_name: str
) -> None:
    legacy = tmp_path / "legacy.db"
    with tmpfs(tmp_path / "disk", "16m") as disk:
        path = items_config(disk, db_url=big_table(legacy, 10), redis_url=redis_url, stream=stream_name)
        assert straw(path, "run", "--once").returncode == 0
        big_table(legacy, 5, first=11)
        remount(disk, "ro")

        ran = straw(path, "run", "--once")
        assert ran.returncode == 1
        assert lines(ran.stderr) == [lines(ran.stderr)[0]] and "Traceback" not in ran.stderr, ran.stderr
        assert f"outbox {disk / 'outbox.db'}: cannot write" in ran.stderr
        assert "writable for this user (or mount the file system read-write)" in ran.stderr

        status = invoke("status", "--config", str(path))
        assert "Traceback" not in status.output
        assert status.exit_code == 0 or f"outbox {disk / 'outbox.db'}" in status.stderr

        checked = invoke("check", "--config", str(path))
        assert checked.exit_code == 1
        assert f"FAIL outbox: {disk / 'outbox.db'}: not writable" in checked.stdout

        remount(disk, "rw")
        assert straw(path, "run", "--once").returncode == 0
    assert_each_row_once(redis_client, stream_name, 15)


def test_a_damaged_outbox_says_move_it_aside_and_a_new_one_continues(
    tmp_path: Path, redis_client: redis.Redis, redis_url: str, stream_name: str
) -> None:
    legacy = tmp_path / "legacy.db"
    path = items_config(tmp_path, db_url=big_table(legacy, 10), redis_url=redis_url, stream=stream_name)
    assert straw(path, "run", "--once").returncode == 0
    big_table(legacy, 5, first=11)
    outbox = tmp_path / "outbox.db"
    outbox.write_bytes(b"this is not a database" * 500)

    for command in (("run", "--once"), ("status",)):
        ran = straw(path, *command)
        assert ran.returncode == 1, (command, ran.stdout)
        assert "Traceback" not in ran.stderr
        assert len(lines(ran.stderr)) == 1, ran.stderr
        assert f"outbox {outbox} is damaged or not an outbox (file is not a database); move it aside" in ran.stderr
        assert "a new outbox starts from the stream's checkpoint in Redis" in ran.stderr

    for part in tmp_path.glob("outbox.db*"):
        part.rename(part.with_name(part.name + ".broken"))
    assert straw(path, "run", "--once").returncode == 0
    assert_each_row_once(redis_client, stream_name, 15)  # the 10 published before are not repeated


def test_the_relay_error_is_redacted_before_it_is_stored(
    tmp_path: Path, redis_url: str, stream_name: str
) -> None:
    path = items_config(tmp_path, db_url=big_table(tmp_path / "legacy.db", 3), redis_url=redis_url,
                        stream=stream_name)
    assert straw(path, "run", "--once").returncode == 0
    port = str(free_port())
    down = with_redis(path, f"redis://127.0.0.1:{port}/0")
    redact.register_secret(port)  # as if the port were a secret: it appears in redis-py's error text
    try:
        Runner(load_config(down)).run(once=True, wait=1.0)
    finally:
        redact._secrets.discard(port)
    with closing(sqlite3.connect(tmp_path / "outbox.db")) as db:
        (stored,) = db.execute("SELECT error FROM streams").fetchone()
    assert "redis unreachable" in stored
    assert port not in stored and "***" in stored


@pytest.fixture
def guarded_redis(private_redis: RedisServer) -> RedisServer:
    """A private Redis that wants a password, with an ACL user allowed nothing but its own keys."""
    client = redis.Redis(port=private_redis.port)
    client.acl_setuser("narrow", enabled=True, passwords=["+narrowpw"], keys=["other:*"], commands=["+@all"])
    client.config_set("requirepass", "rightpw")
    client.close()
    return private_redis


@pytest.mark.parametrize(("credentials", "expected"), [
    (":wrongpw@", "Redis authentication failed"),
    ("", "Redis authentication failed"),
    ("narrow:wrongpw@", "Redis authentication failed"),
    ("narrow:narrowpw@", "Redis authorization failed"),
])
def test_refused_redis_credentials_fail_fast_with_one_line(
    tmp_path: Path, guarded_redis: RedisServer, stream_name: str, credentials: str, expected: str
) -> None:
    url = f"redis://{credentials}127.0.0.1:{guarded_redis.port}/0"
    path = items_config(tmp_path, db_url=big_table(tmp_path / "legacy.db", 3), redis_url=url, stream=stream_name)
    ran = subprocess.run(straw_command(path, "run", "--once", "--wait", "600"), capture_output=True, text=True,
                         timeout=60, check=False)  # not retried for --wait's 10 minutes
    assert ran.returncode == 1
    assert expected in ran.stderr, ran.stderr
    assert "unreachable" not in ran.stderr and "Traceback" not in ran.stderr
    assert "wrongpw" not in ran.stderr + ran.stdout and "narrowpw" not in ran.stderr + ran.stdout

    continuous = subprocess.run(straw_command(path, "run"), capture_output=True, text=True, timeout=60, check=False)
    assert continuous.returncode == 1  # a service run stops too, rather than retry a password forever
    assert expected in continuous.stderr, continuous.stderr

    for command in ("check", "status"):
        shown = invoke(command, "--config", str(path))
        assert expected in shown.stdout, shown.output


def test_refused_database_credentials_say_so(tmp_path: Path, mariadb_url: str, redis_url: str,
                                             stream_name: str) -> None:
    wrong = mariadb_url.replace("root@", "root:wrongpw@")
    path = items_config(tmp_path, db_url=wrong, redis_url=redis_url, stream=stream_name)
    ran = straw(path, "run", "--once")
    assert ran.returncode == 1
    assert "Traceback" not in ran.stderr
    assert "items: database authentication failed (OperationalError: (1045, \"Access denied for user" in ran.stderr
    assert "wrongpw" not in ran.stderr


def test_check_writes_nothing(tmp_path: Path, redis_url: str, stream_name: str) -> None:
    nowhere = tmp_path / "not" / "yet"
    path = items_config(tmp_path, db_url=big_table(tmp_path / "legacy.db", 3), redis_url=redis_url,
                        stream=stream_name)
    config = yaml.safe_load(path.read_text())
    config["outbox"]["path"] = str(nowhere / "outbox.db")
    path.write_text(yaml.safe_dump(config))
    checked = invoke("check", "--config", str(path))
    assert checked.exit_code == 0, checked.output
    assert f"ok   outbox: {nowhere / 'outbox.db'} (not created yet; {tmp_path} is writable" in checked.stdout
    assert not (tmp_path / "not").exists()

    assert straw(path, "run", "--once").returncode == 0
    before = sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in nowhere.iterdir())
    checked = invoke("check", "--config", str(path))
    assert checked.exit_code == 0, checked.output
    assert f"ok   outbox: {nowhere / 'outbox.db'} (backlog 0, " in checked.stdout
    assert sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in nowhere.iterdir()) == before

    with tmpfs(tmp_path / "ro", "1m") as ro:
        remount(ro, "ro")
        config["outbox"]["path"] = str(ro / "sub" / "outbox.db")
        path.write_text(yaml.safe_dump(config))
        checked = invoke("check", "--config", str(path))
        assert checked.exit_code == 1
        assert f"FAIL outbox: {ro / 'sub' / 'outbox.db'}: cannot be created: {ro} is not writable" in checked.stdout
