"""Logging in to a legacy web UI when challenged, in both modes, without ever leaking the credentials.

The fixture UI keeps an access log (request lines, query strings included) like a real web server:
the password must never be in it, nor in straw's logs, errors or debug files.
"""

from __future__ import annotations

import importlib.util
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
import yaml

from adapters.scrape import ScrapeSource
from adapters.scrape.errors import LoginFailed
from adapters.scrape.fetch_browser import BrowserFetcher
from adapters.scrape.fetch_static import StaticFetcher
from adapters.scrape.login import check_submission
from fixtures.webui import WebUI, start_webui
from fixtures.webui.configs import grid_list, orders_list, scrape_config
from fixtures.webui.server import OWNER, PASSWORD
from straw.config_load import load_config
from straw.config_scrape import ScrapeMode, ScrapeSourceSpec
from tests.helpers import read_stream, run_once

CHROMIUM = Path("/usr/bin/chromium")
BROWSER = pytest.param(
    "browser",
    marks=pytest.mark.skipif(
        importlib.util.find_spec("playwright") is None or not CHROMIUM.exists(),
        reason="browser mode needs Playwright and Chromium at /usr/bin/chromium",
    ),
)
MODES = ["static", BROWSER]


@pytest.fixture
def options(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The fixture UI's login variant, from `parametrize(..., indirect=True)`."""
    return dict(getattr(request, "param", {}))


@pytest.fixture
def webui(options: dict[str, Any]) -> Iterator[WebUI]:
    ui = start_webui(35, **options)
    yield ui
    ui.stop()


def subjects(client: redis.Redis, stream: str) -> list[str]:
    return [entry["event"]["subject"] for entry in read_stream(client, stream)]


def edit(path: Path, change: Any) -> None:
    """Change the generated straw.yaml's source in place."""
    config = yaml.safe_load(path.read_text())
    change(config["sources"][0])
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))


def leaked(ui: WebUI, *texts: str) -> list[str]:
    """Where the password shows: the server's access log, straw's output, the files straw wrote."""
    found = [line for line in ui.access_log if PASSWORD in line]
    found += [text for text in texts if PASSWORD in text]
    return found


@pytest.mark.parametrize("options", [{"anonymous": "403"}, {"anonymous": "401"}], indirect=True)
@pytest.mark.parametrize("mode", MODES)
def test_403_or_401_for_anonymous_users_is_a_login_challenge(
    tmp_path: Path, webui: WebUI, mode: str, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    path = scrape_config(tmp_path, webui, redis_url=redis_url, stream=stream_name, listing=orders_list(), mode=mode)
    assert run_once(path).errors == []
    assert subjects(redis_client, stream_name) == [str(no) for no in range(1001, 1036)]
    assert webui.logins == 1
    # The session is kept; once it is gone (the server forgot it), the 403 brings a fresh login.
    assert run_once(path).errors == []
    assert webui.logins == 1
    webui.expire_sessions()
    assert run_once(path).errors == []
    assert webui.logins == 2


@pytest.mark.parametrize("options", [{"anonymous": "403"}], indirect=True)
@pytest.mark.parametrize("mode", MODES)
def test_403_mid_run_on_a_detail_page_logs_in_once_and_asks_again(
    tmp_path: Path, webui: WebUI, mode: str, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    path = scrape_config(tmp_path, webui, redis_url=redis_url, stream=stream_name, listing=orders_list(), mode=mode)
    assert run_once(path).errors == []
    webui.orders[1030].note = "changed"
    webui.expire_at = webui.requests + 4 + 10  # four list pages, then ten detail pages: the rest are 403
    list_hits = webui.hits["/orders"]
    assert run_once(path).errors == []
    assert webui.logins == 2
    assert webui.hits["/orders"] == list_hits + 4  # the listing was not read again: only the refused page
    assert subjects(redis_client, stream_name)[35:] == ["1030"]


@pytest.mark.parametrize("mode", MODES)
def test_grid_paged_by_postbacks_meets_a_403_mid_listing_and_starts_over_after_logging_in(
    tmp_path: Path, mode: str, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    ui = start_webui(35, anonymous="403")
    try:
        path = scrape_config(tmp_path, ui, redis_url=redis_url, stream=stream_name, listing=grid_list(),
                             mode=mode, with_detail=False)
        assert run_once(path).errors == []
        ui.expire_at = ui.requests + 3  # the second postback is refused
        ui.orders[1034].paid = not ui.orders[1034].paid
        assert run_once(path).errors == []
        assert ui.logins == 2
        assert subjects(redis_client, stream_name)[35:] == ["1034"]  # nothing vanished: the listing was whole
    finally:
        ui.stop()


@pytest.mark.parametrize("options", [{"anonymous": "403"}], indirect=True)
@pytest.mark.parametrize("mode", MODES)
def test_a_second_challenge_right_after_logging_in_is_a_clear_error(
    tmp_path: Path, webui: WebUI, mode: str, redis_url: str, redis_client: redis.Redis, stream_name: str,
    capfd: pytest.CaptureFixture[str],
) -> None:
    path = scrape_config(tmp_path, webui, redis_url=redis_url, stream=stream_name, listing=orders_list(), mode=mode)

    def wrong(source: dict[str, Any]) -> None:
        source["login"]["fields"]["UserName"] = "mallory"  # wrong credentials...
        source["login"]["success"] = {"selector": "body"}  # ...and a success check any page passes

    edit(path, wrong)
    result = run_once(path)
    assert len(result.errors) == 1
    error = result.errors[0]
    assert "HTTP 403" in error and "right after logging in" in error
    assert "login.fields" in error and "login.success" in error
    assert webui.logins == 0
    assert webui.hits.get("/login", 0) == 2  # one login (form + POST), not a loop
    assert redis_client.xlen(stream_name) == 0
    captured = capfd.readouterr()
    assert leaked(webui, error, captured.out, captured.err) == []


@pytest.mark.parametrize("mode", MODES)
def test_login_when_always_logs_in_at_the_start_of_every_run(
    tmp_path: Path, webui: WebUI, mode: str, redis_url: str, stream_name: str
) -> None:
    path = scrape_config(tmp_path, webui, redis_url=redis_url, stream=stream_name, listing=orders_list(), mode=mode,
                         with_detail=False)
    edit(path, lambda source: source["login"].update(when="always"))
    assert run_once(path).errors == []
    assert run_once(path).errors == []
    assert webui.logins == 2
    assert webui.hits["/orders"] == 2 * 4  # never sent to the login page first


def without_form(source: dict[str, Any]) -> None:
    del source["login"]["form"]


@pytest.mark.parametrize("options", [{"search_form": True}], indirect=True)
@pytest.mark.parametrize("mode", MODES)
def test_a_get_search_form_before_the_login_form_never_gets_the_credentials(
    tmp_path: Path, webui: WebUI, mode: str, redis_url: str, redis_client: redis.Redis, stream_name: str,
    capfd: pytest.CaptureFixture[str],
) -> None:
    path = scrape_config(tmp_path, webui, redis_url=redis_url, stream=stream_name, listing=orders_list(), mode=mode,
                         with_detail=False)
    edit(path, without_form)  # the default: the form holding the configured inputs and a password box
    result = run_once(path)
    assert result.errors == []
    assert webui.logins == 1
    assert len(subjects(redis_client, stream_name)) == 35
    assert webui.hits.get("/search") is None
    captured = capfd.readouterr()
    assert leaked(webui, captured.out, captured.err) == []


@pytest.mark.parametrize("options", [{"search_form": True}], indirect=True)
@pytest.mark.parametrize("mode", MODES)
def test_credentials_are_never_sent_with_get_even_to_the_configured_form(
    tmp_path: Path, webui: WebUI, mode: str, redis_url: str, stream_name: str
) -> None:
    path = scrape_config(tmp_path, webui, redis_url=redis_url, stream=stream_name, listing=orders_list(), mode=mode,
                         with_detail=False)
    edit(path, lambda source: source["login"].update(form="form#search", fields={"q": PASSWORD}))
    result = run_once(path)
    assert len(result.errors) == 1
    assert "is sent with GET" in result.errors[0] and "refusing" in result.errors[0]
    assert webui.hits.get("/search") is None
    assert leaked(webui, result.errors[0]) == []


@pytest.mark.parametrize("mode", MODES)
def test_no_form_with_the_configured_inputs_is_an_error_naming_what_was_tried(
    tmp_path: Path, webui: WebUI, mode: str, redis_url: str, stream_name: str
) -> None:
    path = scrape_config(tmp_path, webui, redis_url=redis_url, stream=stream_name, listing=orders_list(), mode=mode,
                         with_detail=False)

    def renamed(source: dict[str, Any]) -> None:
        without_form(source)
        source["login"]["fields"] = {"username": "alice", "Password": PASSWORD}

    edit(path, renamed)
    result = run_once(path)
    assert len(result.errors) == 1
    error = result.errors[0]
    assert "no login form on" in error and "tried every form (no `login.form` given), 1 form(s) matched" in error
    assert "Password, username" in error
    assert webui.access_log and all(not line.startswith("POST") for line in webui.access_log)
    assert leaked(webui, error) == []


@pytest.mark.parametrize("mode", MODES)
def test_credentials_are_never_sent_to_another_origin(
    tmp_path: Path, mode: str, redis_url: str, stream_name: str
) -> None:
    ui = start_webui(5)
    # The same server under another host name: another origin all the same.
    ui.login_action = ui.url.replace("127.0.0.1", "localhost") + "login"
    try:
        path = scrape_config(tmp_path, ui, redis_url=redis_url, stream=stream_name, listing=orders_list(),
                             mode=mode, with_detail=False)
        result = run_once(path)
        assert len(result.errors) == 1
        assert "another origin" in result.errors[0] and "localhost" in result.errors[0]
        assert not any(line.startswith("POST") for line in ui.access_log)
    finally:
        ui.stop()


def test_never_from_an_https_login_page_to_plain_http() -> None:
    with pytest.raises(LoginFailed, match="another origin"):
        check_submission("s", "https://erp.example/login", "post", "http://erp.example/login")
    with pytest.raises(LoginFailed, match="another origin"):
        check_submission("s", "https://erp.example/login", "POST", "https://erp.example:8443/login")
    check_submission("s", "https://erp.example/login", "post", "https://ERP.example:443/session")


@pytest.mark.parametrize("options", [{"anonymous": "403", "search_form": True, "login_style": "sidebar"}],
                         indirect=True)
@pytest.mark.parametrize("mode", MODES)
def test_sidebar_login_at_the_site_root(
    tmp_path: Path, webui: WebUI, mode: str, redis_url: str, redis_client: redis.Redis, stream_name: str,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """The second tracker: 403 for anonymous users, a search form first, the login form in the
    sidebar of the root page (`login.url: "."`), a single-use token."""
    path = scrape_config(tmp_path, webui, redis_url=redis_url, stream=stream_name, listing=orders_list(), mode=mode)
    edit(path, lambda source: (without_form(source), source["login"].update(url=".")))
    assert run_once(path).errors == []
    assert webui.logins == 1
    assert len(subjects(redis_client, stream_name)) == 35
    captured = capfd.readouterr()
    assert leaked(webui, captured.out, captured.err) == []


@pytest.mark.parametrize("options", [{"anonymous": "403", "fail_login_posts": 1}], indirect=True)
def test_a_failed_login_post_is_retried_with_a_fresh_single_use_token(
    tmp_path: Path, webui: WebUI, redis_url: str, stream_name: str
) -> None:
    path = scrape_config(tmp_path, webui, redis_url=redis_url, stream=stream_name, listing=orders_list(),
                         with_detail=False)
    assert run_once(path).errors == []
    assert webui.logins == 1
    assert webui.hits["/login"] == 4  # form, POST (503), form again, POST


def test_an_at_sign_in_a_query_string_is_kept_and_not_masked(
    tmp_path: Path, webui: WebUI, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    listing = {**orders_list(), "url": f"orders?owner={OWNER}"}
    path = scrape_config(tmp_path, webui, redis_url=redis_url, stream=stream_name, listing=listing,
                         with_detail=False)
    assert run_once(path).errors == []
    assert len(subjects(redis_client, stream_name)) == 35  # every page, the owner kept in the pager links
    webui.layout = "v2"
    result = run_once(path)
    assert len(result.errors) == 1
    assert f"{webui.url}orders?owner={OWNER}" in result.errors[0]  # the URL as it is: no password in it


@pytest.mark.parametrize("mode", MODES)
def test_debug_pages_are_owner_only(
    tmp_path: Path, webui: WebUI, mode: str, redis_url: str, stream_name: str
) -> None:
    path = scrape_config(tmp_path, webui, redis_url=redis_url, stream=stream_name, listing=orders_list(), mode=mode,
                         with_detail=False)
    webui.layout = "v2"
    assert len(run_once(path).errors) == 1
    debug = tmp_path / "debug"
    assert stat.S_IMODE(debug.stat().st_mode) == 0o700
    saved = list(debug.iterdir())
    assert saved and {p.suffix for p in saved} == ({".html", ".png"} if mode == "browser" else {".html"})
    for file in saved:
        assert stat.S_IMODE(file.stat().st_mode) == 0o600, file
        assert PASSWORD not in file.name


def test_one_session_file_for_both_modes(
    tmp_path: Path, webui: WebUI, redis_url: str, stream_name: str
) -> None:
    pytest.importorskip("playwright")
    path = scrape_config(tmp_path, webui, redis_url=redis_url, stream=stream_name, listing=orders_list(),
                         with_detail=False)
    assert run_once(path).errors == []
    edit(path, lambda source: source.update(mode="browser"))
    assert run_once(path).errors == []
    edit(path, lambda source: source.update(mode="static"))
    assert run_once(path).errors == []
    assert webui.logins == 1  # each mode used the session the other one saved
    state = orjson.loads((tmp_path / "session.json").read_bytes())
    assert [c["name"] for c in state["cookies"]] == ["SID"] and state["origins"] == []


@pytest.mark.parametrize("content", [b"{not json", b'[{"name": "SID"}]', b'{"cookies": "SID=1"}',
                                     b'{"cookies": [{"name": "SID", "value": "x", "domain": "127.0.0.1", '
                                     b'"path": "/", "expires": 1000}], "origins": []}'])
@pytest.mark.parametrize("mode", MODES)
def test_an_unreadable_foreign_or_stale_session_file_is_ignored_with_a_warning(
    tmp_path: Path, webui: WebUI, mode: str, content: bytes, redis_url: str, stream_name: str,
    capfd: pytest.CaptureFixture[str],
) -> None:
    path = scrape_config(tmp_path, webui, redis_url=redis_url, stream=stream_name, listing=orders_list(), mode=mode,
                         with_detail=False)
    session = tmp_path / "session.json"
    session.write_bytes(content)
    assert run_once(path).errors == []
    assert webui.logins == 1
    captured = capfd.readouterr()
    logged = captured.out + captured.err
    assert "session file ignored" in logged and str(session) in logged
    assert orjson.loads(session.read_bytes())["cookies"][0]["name"] == "SID"  # replaced by a good one


def test_sources_on_one_host_share_one_connection_pool_and_rate_limit(
    tmp_path: Path, redis_url: str, stream_name: str
) -> None:
    ui = start_webui(40, detail_delay=0.05)
    try:
        specs = []
        for name, concurrency, rate in (("a", 2, None), ("b", 4, 1000.0)):
            folder = tmp_path / name
            folder.mkdir()
            path = scrape_config(folder, ui, redis_url=redis_url, stream=stream_name, listing=orders_list(),
                                 name=name, http={"concurrency": concurrency, "rate_limit": rate, "retries": 0})
            spec = load_config(path).sources[0]
            assert isinstance(spec, ScrapeSourceSpec)
            specs.append(spec)
        sources = [ScrapeSource(spec) for spec in specs]
        try:
            first, second = (s.fetcher for s in sources)
            assert isinstance(first, StaticFetcher) and isinstance(second, StaticFetcher)
            assert first.host is not None and first.host is second.host
            assert first.host.connections == 2
            assert first.limit is second.limit and first.limit.interval == 1 / 1000.0
            browser = ScrapeSource(specs[0].model_copy(update={"name": "c", "mode": ScrapeMode.BROWSER}))
            assert isinstance(browser.fetcher, BrowserFetcher) and browser.fetcher.limit is first.limit
            browser.close()  # never started a browser

            crawls = [threading.Thread(target=source.crawl) for source in sources]
            for thread in crawls:
                thread.start()
            for thread in crawls:
                thread.join()
            assert all(s.last is not None and len(s.last.items) == 40 for s in sources)
            # Each source reads detail pages 2 and 4 at a time; the server never sees more than 2.
            assert ui.max_in_flight <= 2
            # Every request gave its slot back: the next crawl is not left waiting for a connection.
            slots = first.host.slots
            assert slots is not None
            assert all(slots.acquire(blocking=False) for _ in range(2)) and not slots.acquire(blocking=False)
            for _ in range(2):
                slots.release()
        finally:
            for source in sources:
                source.close()
    finally:
        ui.stop()


def test_the_readme_login_example_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("**A login-protected list and detail UI, step by step.**", 1)[1]
    example = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    entity = ("entities:\n  issue:\n    key: [id]\n    fields: {id: integer, subject: string, state: string, "
              "created: datetime, description: string}\n")
    for var in ("TRACKER_USER", "TRACKER_PASSWORD"):
        monkeypatch.setenv(var, "x" * 8)
    path = tmp_path / "straw.yaml"
    path.write_text(entity + example)
    spec = load_config(path).source("tracker-issues")
    assert isinstance(spec, ScrapeSourceSpec) and spec.login is not None
    assert spec.login.form is None and spec.login.when == "challenged"
    source = ScrapeSource(spec)
    assert source.crawler.url(spec.login.url) == "https://tracker.intranet/"
    assert source.crawler.url(spec.listing.url).endswith("assigned_to=alice@example.com")
    source.close()


def test_a_redirect_to_the_login_page_is_a_challenge_even_when_no_form_shows(
    tmp_path: Path, webui: WebUI, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    """Static mode cannot see a login form built by JavaScript: the redirect alone must stop the run,
    or the login page would be read as an empty listing and every item published as deleted."""
    listing = {**orders_list(), "min_rows": 0}
    path = scrape_config(tmp_path, webui, redis_url=redis_url, stream=stream_name, listing=listing,
                         with_detail=False)
    assert run_once(path).errors == []
    assert len(subjects(redis_client, stream_name)) == 35
    webui.login_style = "script"
    webui.expire_sessions()
    result = run_once(path)
    assert len(result.errors) == 1
    assert "no login form on" in result.errors[0]
    assert len(subjects(redis_client, stream_name)) == 35  # nothing deleted
