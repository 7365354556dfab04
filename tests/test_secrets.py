"""A password from the environment or a file never shows: not in check, status, logs, errors or the stream.

The secrets hold URL-special characters ('@', '/', '#'), as real passwords do;
`MARKER`, the run of plain characters between them, must not show either, so a
password split by a misparsed URL would be caught too.
"""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

from fixtures.legacy_orders import create_orders
from straw.config_load import ConfigError, load_config
from straw.local_redis import free_port
from tests.helpers import orders_config
from tests.test_cli import invoke, run_straw

MARKER = f"Q7{uuid.uuid4().hex[:10]}"
SECRET = f"Zx9@{MARKER}/k#"


def assert_hidden(*texts: str) -> None:
    for text in texts:
        assert SECRET not in text and MARKER not in text, text


def pg_source_url(pg_url: str, *, user: str = "postgres", port: int | None = None) -> str:
    """The scratch database's URL, its password taken from ${PG_PASSWORD}."""
    url = make_url(pg_url)
    return f"postgresql+psycopg://{user}:${{PG_PASSWORD}}@{url.host}:{port or url.port}/{url.database}"


def everything_in_redis(client: redis.Redis, stream: str) -> str:
    entries = [f"{key!r}{value!r}" for _, fields in client.xrange(stream) for key, value in fields.items()]
    checkpoint = [f"{k!r}{v!r}" for k, v in client.hgetall(f"straw:ckpt:{{{stream}}}").items()]
    return "".join(entries + checkpoint)


def test_a_working_postgres_source_never_shows_its_password(
    tmp_path: Path, pg_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = create_engine(pg_url)
    create_orders(engine, 8)
    engine.dispose()
    monkeypatch.setenv("PG_PASSWORD", SECRET)  # trust auth accepts it; it must still never show
    path = orders_config(tmp_path, db_url=pg_source_url(pg_url), redis_url=redis_url, stream=stream_name)

    check = invoke("check", "--config", str(path))
    assert check.exit_code == 0, check.output
    assert "ok   source orders: postgresql+psycopg://postgres:***@" in check.stdout
    ran = run_straw("run", "--once", "--log-level", "DEBUG", "--config", str(path),
                    env={"PG_PASSWORD": SECRET, "STRAW_LOG_FORMAT": "json"})
    assert ran.returncode == 0, ran.stderr
    assert '"event": "polled"' in ran.stderr or '"event":"polled"' in ran.stderr
    status = invoke("status", "--config", str(path))
    assert status.exit_code == 0

    assert_hidden(check.output, ran.stdout, ran.stderr, status.output)
    assert redis_client.xlen(stream_name) == 8
    assert_hidden(everything_in_redis(redis_client, stream_name))
    assert SECRET.encode() not in Path(tmp_path / "outbox.db").read_bytes()


@pytest.mark.parametrize("failure", ["unknown-role", "closed-port"])
def test_a_failing_postgres_source_never_shows_its_password(
    tmp_path: Path, pg_url: str, redis_url: str, stream_name: str, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    monkeypatch.setenv("PG_PASSWORD", SECRET)
    db_url = (
        pg_source_url(pg_url, user="straw_no_such_role")
        if failure == "unknown-role"
        else pg_source_url(pg_url, port=free_port())
    )
    path = orders_config(tmp_path, db_url=db_url, redis_url=redis_url, stream=stream_name)
    expected = 'role "straw_no_such_role" does not exist' if failure == "unknown-role" else "Connection refused"

    check = invoke("check", "--config", str(path))
    assert check.exit_code == 1
    [source_line] = [line for line in check.stdout.splitlines() if line.startswith("FAIL source orders")]
    assert expected in source_line
    ran = run_straw("run", "--once", "--wait", "5", "--config", str(path), env={"PG_PASSWORD": SECRET})
    assert ran.returncode == 1
    assert expected in ran.stderr and "poll failed" in ran.stderr
    status = invoke("status", "--config", str(path))
    assert expected in status.stdout  # the source's last error

    assert_hidden(check.output, ran.stdout, ran.stderr, status.output)


def test_a_password_from_a_file_never_shows_in_config_errors(tmp_path: Path) -> None:
    (tmp_path / "pg_password").write_text(SECRET + "\n")
    path = orders_config(
        tmp_path, db_url="postgresql+psycopg://straw:${file:pg_password}@erp-db/erp",
        redis_url="redis://127.0.0.1:6379/0", stream="erp.orders", mode="timestamps",
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "did you mean 'timestamp'" in str(caught.value)
    assert_hidden(str(caught.value))


def test_a_secret_used_as_a_bad_value_is_masked_in_the_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PG_PASSWORD", SECRET)
    path = orders_config(
        tmp_path, db_url="sqlite:///legacy.db", redis_url="redis://127.0.0.1:6379/0", stream="erp.orders",
        mode="${PG_PASSWORD}",  # a slip of the pen that puts the password where the mode belongs
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    [problem] = caught.value.problems
    assert problem.key == "sources[0].mode" and "***" in problem.message
    assert_hidden(str(caught.value))
    result = invoke("check", "--config", str(path))
    assert result.exit_code == 2
    assert_hidden(result.output)


@pytest.mark.parametrize("redis_password", ["inline", "from-env"])
def test_a_redis_password_never_shows(
    tmp_path: Path, stream_name: str, monkeypatch: pytest.MonkeyPatch, redis_password: str
) -> None:
    legacy = f"sqlite:///{tmp_path / 'legacy.db'}"
    engine = create_engine(legacy)
    create_orders(engine, 3)
    engine.dispose()
    monkeypatch.setenv("REDIS_PASSWORD", SECRET)
    password = SECRET.replace("@", "%40").replace("/", "%2F").replace("#", "%23")  # written inline, URL-encoded
    url = f"redis://:{password if redis_password == 'inline' else '${REDIS_PASSWORD}'}@127.0.0.1:{free_port()}/0"
    path = orders_config(tmp_path, db_url=legacy, redis_url=url, stream=stream_name)

    check = invoke("check", "--config", str(path))
    assert check.exit_code == 1 and "FAIL redis: unreachable" in check.stdout
    ran = run_straw("run", "--once", "--wait", "1", "--config", str(path), env={"REDIS_PASSWORD": SECRET})
    assert ran.returncode == 1
    status = invoke("status", "--config", str(path))
    assert "redis unreachable" in status.stdout

    assert_hidden(check.output, ran.stdout, ran.stderr, status.output)
    assert password not in check.output + ran.stderr + status.output
    with sqlite3.connect(tmp_path / "outbox.db") as db:
        assert_hidden(repr(db.execute("SELECT * FROM streams").fetchall()))
