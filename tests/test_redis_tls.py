"""Redis over TLS with a private CA, a client certificate and an ACL user, against a private redis-server
started here with TLS only; and the mistakes an operator makes with them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from fixtures.tls_redis import PASSWORD, USER, TlsRedis, start_tls_redis
from straw.config_load import ConfigError, load_config
from tests.bigtable import big_table, items_config
from tests.test_cli import run_straw

ROWS = 25
STREAM = "tls.items"


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[TlsRedis]:
    server = start_tls_redis(tmp_path / "redis", f"~{STREAM} ~straw:ckpt:*")
    try:
        yield server
    finally:
        server.stop()


def config(tmp_path: Path, url: str) -> Path:
    return items_config(tmp_path, db_url=big_table(tmp_path / "legacy.db", ROWS), redis_url=url, stream=STREAM)


def test_records_reach_a_tls_redis_with_a_client_certificate_as_an_acl_user(
    tmp_path: Path, tls_redis: TlsRedis
) -> None:
    path = config(tmp_path, tls_redis.url())
    run = run_straw("run", "--once", "--config", str(path))
    assert run.returncode == 0, run.stderr
    assert "read 25 rows; outbox backlog 0" in run.stdout
    check = run_straw("check", "--config", str(path))
    assert check.returncode == 0, check.stdout + check.stderr
    client = redis.Redis.from_url(tls_redis.url())
    try:
        assert client.xlen(STREAM) == ROWS
        with pytest.raises(redis.exceptions.NoPermissionError):  # it is the restricted ACL user that published
            client.xlen("another.stream")
    finally:
        client.close()
    assert PASSWORD not in run.stdout + run.stderr + check.stdout + check.stderr


@pytest.mark.parametrize(
    ("mistake", "expected"),
    [
        ("wrong_ca", "certificate verify failed"),
        ("no_client_cert", "unreachable"),
        ("wrong_password", "Redis authentication failed"),
        ("plain_redis", "unreachable"),
    ],
)
def test_tls_mistakes_are_one_line_from_check_without_the_password(
    tmp_path: Path, tls_redis: TlsRedis, mistake: str, expected: str
) -> None:
    url = {
        "wrong_ca": tls_redis.url(ca=tls_redis.certs.other_ca),
        "no_client_cert": tls_redis.url(client_cert=False),
        "wrong_password": tls_redis.url(password="not-the-password-9"),
        "plain_redis": f"redis://{USER}:{PASSWORD}@127.0.0.1:{tls_redis.port}/0",
    }[mistake]
    check = run_straw("check", "--config", str(config(tmp_path, url)))
    assert check.returncode == 1
    output = check.stdout + check.stderr
    redis_lines = [line for line in output.splitlines() if "redis" in line.lower()]
    assert any(expected in line for line in redis_lines), output
    assert PASSWORD not in output and "not-the-password-9" not in output
    assert "Traceback" not in output


def test_an_acl_user_without_the_stream_keys_is_told_what_to_grant(tmp_path: Path) -> None:
    server = start_tls_redis(tmp_path / "redis", "~some.other.stream")
    try:
        path = config(tmp_path, server.url())
        run = run_straw("run", "--once", "--wait", "5", "--config", str(path))
    finally:
        server.stop()
    assert run.returncode == 1
    assert "Redis authorization failed" in run.stderr and "+@stream" in run.stderr, run.stderr
    assert PASSWORD not in run.stdout + run.stderr


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("ssl_ca_cert=/etc/ssl/ca.pem", "unknown option 'ssl_ca_cert' in the URL's query; did you mean 'ssl_ca_certs'"),
        ("ssl_ca_certs=ca.pem", "ssl_ca_certs=ca.pem: write an absolute path, or ${CONFIG_DIR}/ca.pem"),
        ("ssl_certfile=/nowhere/client.pem", "ssl_certfile: /nowhere/client.pem does not exist; fix the path"),
        ("ssl_password=hunter22", "a key file's password cannot go in the URL"),
    ],
)
def test_tls_options_in_the_url_are_checked_at_load(tmp_path: Path, query: str, message: str) -> None:
    path = config(tmp_path, f"rediss://127.0.0.1:6380/0?{query}")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    [problem] = caught.value.problems
    assert message in str(problem) and str(problem).startswith(f"{path}:3: redis.url: ")
    assert "hunter22" not in str(problem)


def test_a_tls_file_beside_the_config_is_found_by_config_dir(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("not read at load")
    path = config(tmp_path, "rediss://127.0.0.1:6380/0?ssl_ca_certs=${CONFIG_DIR}/ca.pem")
    assert load_config(path).redis.url.endswith(f"ssl_ca_certs={tmp_path.resolve()}/ca.pem")
