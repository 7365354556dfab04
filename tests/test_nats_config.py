"""The NATS parts of the configuration: each mistake is one `file:line: key: message` line; the token is a secret."""

from __future__ import annotations

from pathlib import Path

import pytest

from bus.nats import JetStreamOptions
from straw.config_load import ConfigError, load_config
from straw.redact import redact
from tests.test_config import BASE, write

NATS_BASE = BASE.replace("redis:\n  url: redis://127.0.0.1:6379/0", "bus:\n  url: nats://127.0.0.1:4222")


@pytest.mark.parametrize(
    ("old", "new", "line", "key", "hint"),
    [
        ("stream: erp.orders", "stream: erp.orders.", 19, "sources[0].stream",
         "empty subject token (a leading, trailing or doubled '.'); NATS subjects cannot"),
        ("stream: erp.orders", "stream: erp..orders", 19, "sources[0].stream",
         "the subject on NATS, e.g. 'erp.orders'"),
        ("  url: nats://127.0.0.1:4222\n", "  url: nats://127.0.0.1:4222\n  jetstream: {stream: erp.orders}\n", 4,
         "bus.jetstream.stream", "cannot name a JetStream stream: no '.', '*', '>'"),
        ("  url: nats://127.0.0.1:4222\n", "  url: redis://127.0.0.1:6379/0\n  jetstream: {stream: ERP}\n", 4,
         "bus.jetstream", "`jetstream` configures a NATS bus; remove it"),
        ("  url: nats://127.0.0.1:4222\n", "  url: nats://127.0.0.1:4222\n  jetstream: {replicas: 7}\n", 4,
         "bus.jetstream.replicas", "less than or equal to 5"),
    ],
    ids=["trailing-dot", "double-dot", "jetstream-name", "jetstream-on-redis", "replicas"],
)
def test_a_nats_mistake_is_one_line_with_file_line_key_and_fix(
    tmp_path: Path, old: str, new: str, line: int, key: str, hint: str
) -> None:
    assert NATS_BASE.count(old) == 1
    path = write(tmp_path, NATS_BASE.replace(old, new))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    [problem] = caught.value.problems
    assert (problem.line, problem.key) == (line, key), str(problem)
    assert str(problem).startswith(f"{path}:{line}: {key}: ") and hint in problem.message


def test_a_redis_bus_takes_a_stream_name_nats_could_not(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, BASE.replace("stream: erp.orders", "stream: erp.orders."))).streams


def test_the_jetstream_block_reaches_the_bus_with_durations_parsed(tmp_path: Path) -> None:
    text = NATS_BASE.replace("  url: nats://127.0.0.1:4222\n", "  url: tls://nats.example:4222\n  jetstream:\n"
                             "    stream: ERP\n    max_age: 168h\n    duplicate_window: 10m\n")
    spec = load_config(write(tmp_path, text)).bus_spec
    assert spec.jetstream_options() == JetStreamOptions("ERP", 168 * 3600.0, None, 600.0, 1)
    assert load_config(write(tmp_path, NATS_BASE)).bus_spec.jetstream_options() == JetStreamOptions()


def test_a_nats_token_in_the_url_is_a_secret(tmp_path: Path) -> None:
    load_config(write(tmp_path, NATS_BASE.replace("nats://127.0.0.1", "nats://s3cr3t-t0ken@127.0.0.1")))
    assert redact("nats://s3cr3t-t0ken@127.0.0.1:4222 refused") == "nats://***@127.0.0.1:4222 refused"
