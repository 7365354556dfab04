"""The scrape adapter in static mode against the fixture legacy web UI, end to end into Redis."""

from __future__ import annotations

import shutil
import stat
import subprocess
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis

from fixtures.webui import WebUI, start_webui
from fixtures.webui.configs import grid_list, orders_list, scrape_config
from fixtures.webui.server import en_accounting
from outbox.store import Outbox
from tests.helpers import read_stream, run_once


@pytest.fixture
def webui() -> Iterator[WebUI]:
    ui = start_webui(35)
    yield ui
    ui.stop()


def events(client: redis.Redis, stream: str) -> list[dict[str, Any]]:
    return [entry["event"] for entry in read_stream(client, stream)]


def test_login_table_layout_details_to_canonical_records(
    tmp_path: Path, webui: WebUI, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    path = scrape_config(tmp_path, webui, redis_url=redis_url, stream=stream_name, listing=orders_list())
    result = run_once(path)
    assert result.errors == []
    published = events(redis_client, stream_name)
    assert [e["subject"] for e in published] == [str(no) for no in range(1001, 1036)]
    first, second = published[0], published[1]
    assert first["type"] == "order.upserted"
    assert first["data"] == {
        "order_no": 1001, "customer": "Café Müller", "order_date": "2026-01-01", "amount": "0.00",
        "paid": True, "status": "OPEN", "note": "Levering 1× per week",  # noqa: RUF001
    }
    assert second["data"]["customer"] == "„Grüße“ GmbH"  # windows-1252 bytes 0x84 and 0x93
    negative = next(e for e in published if e["subject"] == "1005")
    assert negative["data"]["amount"] == str(webui.orders[1005].amount) and negative["data"]["amount"][0] == "-"
    assert webui.logins == 1
    assert webui.hits["/order/1035"] == 1


def test_only_new_and_changed_items_then_deleted_after_a_complete_listing(
    tmp_path: Path, webui: WebUI, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    path = scrape_config(tmp_path, webui, redis_url=redis_url, stream=stream_name, listing=orders_list(),
                         with_detail=False)
    assert run_once(path).errors == []
    assert len(events(redis_client, stream_name)) == 35
    assert run_once(path).errors == []
    assert len(events(redis_client, stream_name)) == 35  # nothing changed, nothing sent
    webui.orders[1007].amount = Decimal("99.95")
    del webui.orders[1020]
    assert run_once(path).errors == []
    new = events(redis_client, stream_name)[35:]
    assert sorted((e["type"], e["subject"]) for e in new) == [("order.deleted", "1020"), ("order.upserted", "1007")]
    assert next(e for e in new if e["subject"] == "1007")["data"]["amount"] == "99.95"


@pytest.mark.parametrize("pagination", ["next", "pages"])
def test_webforms_postback_pagination_and_undeclared_windows_1252(
    tmp_path: Path, webui: WebUI, redis_url: str, redis_client: redis.Redis, stream_name: str, pagination: str
) -> None:
    path = scrape_config(tmp_path, webui, redis_url=redis_url, stream=stream_name, listing=grid_list(pagination),
                         with_detail=False)
    assert run_once(path).errors == []
    published = events(redis_client, stream_name)
    assert [e["subject"] for e in published] == [str(no) for no in range(1001, 1036)]
    by_no = {e["data"]["order_no"]: e["data"] for e in published}
    order = webui.orders[1005]
    assert en_accounting(order.amount).startswith("(")  # the grid shows it as (1,234.56)
    assert by_no[1005]["amount"] == str(order.amount)
    assert by_no[1002]["customer"] == "„Grüße“ GmbH"
    assert by_no[1035]["order_date"] == webui.orders[1035].date.isoformat()  # '4. feb. 2026' in Danish


def test_page_number_links_and_swapped_columns(
    tmp_path: Path, webui: WebUI, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    webui.columns = "swapped"  # read by header name: the reordering changes nothing
    path = scrape_config(tmp_path, webui, redis_url=redis_url, stream=stream_name, listing=orders_list("pages"),
                         with_detail=False, http={"rate_limit": 500, "concurrency": 2, "retries": 0})
    assert run_once(path).errors == []
    published = events(redis_client, stream_name)
    assert len(published) == 35 and len({e["subject"] for e in published}) == 35
    assert published[3]["data"]["order_date"] == "2026-01-04"


def test_loop_guard_stops_at_a_page_read_before(
    tmp_path: Path, webui: WebUI, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    webui.next_wraps = True
    path = scrape_config(tmp_path, webui, redis_url=redis_url, stream=stream_name, listing=orders_list(),
                         with_detail=False)
    assert run_once(path).errors == []
    assert redis_client.xlen(stream_name) == 35
    assert webui.hits["/orders"] == 1 + 4 + 1  # met the login form, four pages, then page 1 again: stop
    del webui.orders[1035]
    assert run_once(path).errors == []  # the loop guard ended a complete listing: 1035 is reported deleted
    assert read_stream(redis_client, stream_name)[-1]["event"]["type"] == "order.deleted"


def test_attribute_and_regex_rules(
    tmp_path: Path, webui: WebUI, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    listing = orders_list()
    listing["fields"]["order_no"] = {"css": "td a", "attr": "href", "regex": r"/order/(\d+)$", "parse": "integer",
                                     "required": True}
    listing["fields"]["customer"] = {"column": "Klant", "regex": r"^\S+"}  # the first word only
    path = scrape_config(tmp_path, webui, redis_url=redis_url, stream=stream_name, listing=listing,
                         with_detail=False)
    assert run_once(path).errors == []
    data = [entry["event"]["data"] for entry in read_stream(redis_client, stream_name)]
    assert [d["order_no"] for d in data] == list(range(1001, 1036))
    assert [d["customer"] for d in data[:3]] == ["Café", "„Grüße“", "Œuvre"]


def test_session_is_reused_across_runs_and_renewed_once_when_expired(
    tmp_path: Path, webui: WebUI, redis_url: str, stream_name: str
) -> None:
    path = scrape_config(tmp_path, webui, redis_url=redis_url, stream=stream_name, listing=orders_list(),
                         with_detail=False)
    assert run_once(path).errors == []
    session = tmp_path / "session.json"
    assert stat.S_IMODE(session.stat().st_mode) == 0o600
    assert run_once(path).errors == []
    assert webui.logins == 1  # the second run used the saved cookie
    webui.expire_sessions()
    assert run_once(path).errors == []
    assert webui.logins == 2


def test_session_expiring_mid_run_logs_in_again_and_reads_everything(
    tmp_path: Path, webui: WebUI, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    path = scrape_config(tmp_path, webui, redis_url=redis_url, stream=stream_name, listing=grid_list(),
                         with_detail=False)
    assert run_once(path).errors == []
    webui.expire_at = webui.requests + 3  # the second postback of the next run meets the login form
    webui.orders[1034].paid = not webui.orders[1034].paid
    assert run_once(path).errors == []
    assert webui.logins == 2
    published = [entry["event"] for entry in read_stream(redis_client, stream_name)]
    assert [e["subject"] for e in published[35:]] == ["1034"]  # nothing vanished from a half-read listing


def test_wrong_password_fails_the_run_without_committing(
    tmp_path: Path, webui: WebUI, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    path = scrape_config(tmp_path, webui, redis_url=redis_url, stream=stream_name, listing=orders_list(),
                         with_detail=False)
    path.write_text(path.read_text().replace("Password: s3cret", "Password: wrong"))
    result = run_once(path)
    assert len(result.errors) == 1
    assert "login at" in result.errors[0] and "did not succeed" in result.errors[0]
    assert redis_client.xlen(stream_name) == 0


def test_retries_5xx_and_basic_auth(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    ui = start_webui(12, basic_auth=("svc", "pa:ss"), fail_next=2)
    try:
        path = scrape_config(tmp_path, ui, redis_url=redis_url, stream=stream_name, listing=orders_list(),
                             with_detail=False, http={"retries": 3, "backoff": 0.01,
                                                      "basic_auth": {"username": "svc", "password": "pa:ss"}})
        assert run_once(path).errors == []
        assert redis_client.xlen(stream_name) == 12
        ui.fail_next = 10
        result = run_once(path)
        assert "failed 4 time(s): HTTP 503" in result.errors[0]
    finally:
        ui.stop()


def test_max_pages_reads_part_of_the_listing_and_deletes_nothing(
    tmp_path: Path, webui: WebUI, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    listing = orders_list()
    path = scrape_config(tmp_path, webui, redis_url=redis_url, stream=stream_name, listing=listing,
                         with_detail=False)
    assert run_once(path).errors == []
    listing["pagination"]["max_pages"] = 2
    path = scrape_config(tmp_path, webui, redis_url=redis_url, stream=stream_name, listing=listing,
                         with_detail=False)
    webui.orders[1003].paid = not webui.orders[1003].paid
    assert run_once(path).errors == []
    new = events(redis_client, stream_name)[35:]
    # Pages 3-4 were not read: their items are not reported deleted.
    assert [(e["type"], e["subject"]) for e in new] == [("order.upserted", "1003")]
    state = {s.source: s for s in Outbox(tmp_path / "outbox.db").sources()}
    assert state["web-orders"].error is None


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a test certificate")
def test_self_signed_intranet_certificate_by_ca_file_or_verify_off(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    ui = start_webui(12, tls=(str(cert), str(key)))
    try:
        def run(verify: object) -> list[str]:
            path = scrape_config(tmp_path, ui, redis_url=redis_url, stream=stream_name, listing=orders_list(),
                                 with_detail=False, http={"verify": verify, "retries": 0})
            return list(run_once(path).errors)

        errors = run(True)
        assert len(errors) == 1 and "CERTIFICATE_VERIFY_FAILED" in errors[0]
        assert "cannot use CA bundle" in run(str(tmp_path / "missing.pem"))[0]
        assert run(str(cert)) == []  # the intranet's CA bundle
        assert redis_client.xlen(stream_name) == 12
        ui.orders[1001].paid = not ui.orders[1001].paid
        assert run(False) == []
        assert redis_client.xlen(stream_name) == 13
    finally:
        ui.stop()


def test_page_number_links_shown_ten_at_a_time_reach_every_page(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    ui = start_webui(150)  # 15 pages; the pager shows at most ten numbers around the current page
    try:
        path = scrape_config(tmp_path, ui, redis_url=redis_url, stream=stream_name, listing=grid_list("pages"),
                             with_detail=False)
        assert run_once(path).errors == []
        subjects = [entry["event"]["subject"] for entry in read_stream(redis_client, stream_name)]
        assert sorted(subjects) == [str(no) for no in range(1001, 1151)]
    finally:
        ui.stop()
