"""straw end to end on NATS JetStream: a run publishes structured CloudEvents that the official SDK parses;
`straw check`, `status` and `stream` speak of the NATS bus; a wrong password is one line."""

from __future__ import annotations

from pathlib import Path

import orjson
from cloudevents.core.bindings.http import HTTPMessage, from_http
from cloudevents.core.formats.json import JSONFormat
from cloudevents.v1.http import from_json

from bus.nats import JetStreamOptions
from fixtures.private_nats import NatsServer
from straw.local_redis import free_port
from straw.records import event_id
from tests.crashes import SOURCE
from tests.helpers import orders_config, run_once
from tests.nats_support import (
    jetstream,
    nats_url,
    private_nats,
    private_nats_for_session,
    read_messages,
    subject,
    use_nats,
)
from tests.test_cli import _legacy, invoke, lines

# fixtures, imported for pytest
__all__ = ["jetstream", "nats_url", "private_nats", "private_nats_for_session", "subject"]


def nats_config(tmp_path: Path, url: str, options: JetStreamOptions, subject: str, rows: int = 20) -> Path:
    written = orders_config(tmp_path, db_url=_legacy(tmp_path, rows), redis_url="redis://unused", stream=subject)
    return use_nats(written, url, options)


def test_every_message_of_a_run_parses_with_the_official_cloudevents_sdk(
    tmp_path: Path, nats_url: str, jetstream: JetStreamOptions, subject: str
) -> None:
    config = nats_config(tmp_path, nats_url, jetstream, subject, rows=120)
    assert run_once(config).errors == []
    assert run_once(config).rows_read == 0, "a second run publishes nothing"
    messages = read_messages(nats_url, jetstream.stream, subject)
    assert len(messages) == 120
    for n, msg in enumerate(messages, start=1):
        body, headers = msg.data or b"", {k.lower(): v for k, v in (msg.headers or {}).items()}
        # The Python SDK has no NATS binding: a NATS message is headers and a body, which its HTTP binding
        # reads with the same rules (content-type application/cloudevents+json, no ce- headers: structured).
        event = from_http(HTTPMessage(headers=headers, body=body), JSONFormat())
        assert event.get_id() == event_id(SOURCE, str(n), f"[{n}]") == headers["nats-msg-id"]
        assert event.get_type() == "order.upserted" and event.get_subject() == str(n)
        assert from_json(body)["id"] == event.get_id()  # and the SDK's v1 API
        assert orjson.loads(body)["data"]["order_no"] == n


def test_check_status_and_stream_speak_of_the_nats_bus(
    tmp_path: Path, nats_url: str, jetstream: JetStreamOptions, subject: str
) -> None:
    config = nats_config(tmp_path, nats_url, jetstream, subject)
    checked = invoke("check", "--config", str(config))
    assert checked.exit_code == 0, checked.output
    assert lines(checked.stdout)[-1].startswith("ok   nats: nats-server 2.")
    assert run_once(config).errors == []
    status = invoke("status", "--config", str(config))
    assert status.exit_code == 0, status.output
    assert f"last message of {subject} in JetStream stream {jetstream.stream}" in status.stdout
    shown = invoke("stream", "--config", str(config), "--count", "3")
    assert shown.exit_code == 0, shown.output
    assert f"{subject}: 20 entries (newest 3)" in shown.stdout


def test_check_says_nats_is_unreachable_or_refuses_the_password_in_one_line(
    tmp_path: Path, private_nats: NatsServer
) -> None:
    closed = f"nats://127.0.0.1:{free_port()}"
    config = nats_config(tmp_path, closed, JetStreamOptions(), "erp.orders")
    result = invoke("check", "--config", str(config))
    assert result.exit_code == 1
    assert lines(result.stdout)[-1].startswith("FAIL nats: unreachable")

    private_nats.stop()
    private_nats.user, private_nats.password = "straw", "right-horse"
    private_nats.start()
    wrong = private_nats.url.replace("right-horse", "wrong-battery")
    use_nats(config, wrong, JetStreamOptions())
    result = invoke("check", "--config", str(config))
    assert result.exit_code == 1
    last = lines(result.stdout)[-1]
    assert last.startswith("FAIL nats: NATS authentication failed") and "check the user and password" in last
    assert "wrong-battery" not in result.output and "Traceback" not in result.output
