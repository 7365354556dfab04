"""A password from the environment or a file never shows: not in check, status, logs, errors or the stream.

The secrets hold URL-special characters ('@', '/', '#'), as real passwords do;
`MARKER`, the run of plain characters between them, must not show either, so a
password split by a misparsed URL would be caught too.
"""

from __future__ import annotations

import sqlite3
import textwrap
import uuid
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

from fixtures.legacy_orders import create_orders
from straw.config_load import ConfigError, load_config
from straw.local_redis import free_port
from straw.redact import redact
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


# --- only secrets are masked (issue 8, item 16): hosts, ports, user and database names, modes stay readable ---


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def test_a_url_is_masked_in_its_password_only(
    tmp_path: Path, pg_url: str, redis_url: str, stream_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: `postgresql+psycopg://***:***@…/***_legacy` and `Error 111 connecting to 127.0.0.1:***`."""
    url = make_url(pg_url)
    closed = free_port()
    monkeypatch.setenv("PG_USER", "postgres")
    monkeypatch.setenv("PG_HOST", str(url.host))
    monkeypatch.setenv("PG_DB", str(url.database))
    monkeypatch.setenv("PG_PASSWORD", SECRET)
    monkeypatch.setenv("REDIS_PORT", str(closed))
    monkeypatch.setenv("STATE_DIR", str(tmp_path / "state"))
    db_url = f"postgresql+psycopg://${{PG_USER}}:${{PG_PASSWORD}}@${{PG_HOST}}:{url.port}/${{PG_DB}}"
    path = orders_config(tmp_path, db_url=db_url, redis_url="redis://127.0.0.1:${REDIS_PORT}/0", stream=stream_name)
    path.write_text(path.read_text().replace(str(tmp_path / "outbox.db"), "${STATE_DIR}/outbox.db"))

    engine = create_engine(pg_url)
    create_orders(engine, 2)
    engine.dispose()
    check = invoke("check", "--config", str(path))
    assert check.exit_code == 1
    shown = check.stdout
    assert f"ok   source orders: postgresql+psycopg://postgres:***@{url.host}:{url.port}/{url.database} " in shown
    assert f"Error 111 connecting to 127.0.0.1:{closed}" in shown and "FAIL redis: unreachable" in shown
    assert f"ok   outbox: {tmp_path / 'state' / 'outbox.db'}" in shown
    monkeypatch.setenv("PG_USER", "straw_no_such_role")
    failed = invoke("check", "--config", str(path))
    assert 'role "straw_no_such_role" does not exist' in failed.stdout
    assert_hidden(check.output, failed.output)


def test_a_plain_value_from_the_environment_is_not_masked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: `${MODE}` set to `browser` showed as `***` wherever it appeared."""
    mode = unique("snapshots")
    monkeypatch.setenv("MODE", mode)
    path = orders_config(tmp_path, db_url="sqlite:///legacy.db", redis_url="redis://127.0.0.1:6379/0",
                         stream="erp.orders", mode="${MODE}")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert f"(got '{mode}')" in str(caught.value)
    assert redact(f"mode {mode}") == f"mode {mode}"


@pytest.mark.parametrize(
    ("where", "written"),
    [
        ("secret file", "postgresql+psycopg://erp@erp-db/${file:pw}"),  # a file's value, wherever it is used
        ("secret-named variable", "postgresql+psycopg://erp@erp-db/${ERP_PASSWORD}"),
        ("url password", "postgresql+psycopg://erp:${ERP_VALUE}@erp-db/erp"),
        ("odbc PWD=", "odbc:Driver={PostgreSQL Unicode};Server=erp-db;Uid=erp;PWD=${ERP_VALUE};"),
        ("odbc inline", "odbc:DSN=erp;UID=erp;Pwd=<secret>;"),
        ("marked secret", "postgresql+psycopg://erp@erp-db/erp?application_name=${secret:ERP_VALUE}"),
    ],
)
def test_secrets_stay_masked_wherever_they_are_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str, written: str
) -> None:
    secret = unique("Zx9")  # a value of its own: the registry is per process, and other cases mask theirs
    (tmp_path / "pw").write_text(secret + "\n")
    monkeypatch.setenv("ERP_PASSWORD", secret)
    monkeypatch.setenv("ERP_VALUE", secret)
    written = written.replace("<secret>", secret)
    path = orders_config(tmp_path, db_url=written, redis_url="redis://127.0.0.1:6379/0", stream="erp.orders")
    assert redact(f"connecting with {secret} failed") == f"connecting with {secret} failed"
    load_config(path)
    assert redact(f"connecting with {secret} failed") == "connecting with *** failed", where


def test_secret_keys_of_a_scrape_source_are_masked_and_the_rest_is_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = {name: unique(name) for name in ("USER", "PW", "TOKEN", "AUTH", "HOST", "SESSION")}
    for name, value in values.items():
        monkeypatch.setenv(f"SCRAPE_{name}", value)
    text = textwrap.dedent(
        """\
        entities: {o: {key: [a], fields: {a: integer}}}
        sources:
          - name: web
            kind: scrape
            mode: static
            url: http://${SCRAPE_HOST}:8080/list?token=${SCRAPE_TOKEN}
            entity: o
            stream: web.o
            list: {rows: tr, fields: {a: td}}
            login:
              url: http://${SCRAPE_HOST}:8080/login
              fields: {j_username: "${SCRAPE_USER}", j_password: "${SCRAPE_PW}"}
              success: {selector: .welcome}
            http:
              headers: {Authorization: "Bearer ${SCRAPE_AUTH}", X-Client: "${SCRAPE_SESSION}"}
        """
    )
    path = tmp_path / "straw.yaml"
    path.write_text(text)
    try:
        load_config(path)
    except ConfigError as exc:  # the scrape model may ask for more; substitution happened before validation
        assert all(values[n] not in str(exc) for n in ("PW", "TOKEN", "AUTH"))
    shown = redact(" ".join(values.values()))
    for name in ("PW", "TOKEN", "AUTH"):
        assert values[name] not in shown, name
    for name in ("USER", "HOST", "SESSION"):
        assert values[name] in shown, name


def test_a_url_whose_query_holds_an_at_sign_is_not_garbled() -> None:
    """Before: `http://127.0.0.1:***@columns=…`."""
    plain = "GET http://127.0.0.1:8080/list?user=a@b.example&columns=x failed"
    assert redact(plain) == plain
    assert redact("http://erp:pw1@10.0.0.5:5432/x?c=a@b") == "http://erp:***@10.0.0.5:5432/x?c=a@b"
    assert redact("redis://:s3cret@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"
