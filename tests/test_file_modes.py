"""Files that hold business data or secrets are owner-only; a readable config holding an inline secret is
flagged (where, never what). Session files and debug artifacts: see test_scrape_login / test_scrape_static."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from outbox.store import Outbox
from straw.config_load import load_config
from tests.bigtable import big_table, items_config


@pytest.fixture
def loose_umask() -> Iterator[None]:
    previous = os.umask(0o022)  # what most hosts have: new files world-readable
    try:
        yield
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_outbox_and_its_wal_files_are_owner_only(tmp_path: Path, loose_umask: None) -> None:
    path = tmp_path / "var" / "straw" / "outbox.db"
    outbox = Outbox(path)
    try:
        outbox.append("s", "stream", [], [], "1", 0)  # a write: the -wal and -shm files exist now
        files = [path, path.with_name("outbox.db-wal"), path.with_name("outbox.db-shm")]
        assert {f.name: mode(f) for f in files} == {f.name: 0o600 for f in files}
        assert mode(path.parent) == 0o700
    finally:
        outbox.close()


def secret_config(tmp_path: Path, url: str, file_mode: int) -> Path:
    path = items_config(tmp_path, db_url=big_table(tmp_path / "legacy.db", 1), redis_url=url, stream="s")
    path.chmod(file_mode)
    return path


def warnings(path: Path, capsys: pytest.CaptureFixture[str]) -> list[str]:
    capsys.readouterr()
    load_config(path)
    out, err = capsys.readouterr()
    assert out == ""  # never into a command's stdout (`status --json` is a JSON document)
    return [line.removeprefix("warning: ") for line in err.splitlines()]


def test_a_world_readable_config_with_an_inline_password_is_flagged_by_line_without_the_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = secret_config(tmp_path, "redis://straw:inline-pw-4711@127.0.0.1:6379/0", 0o644)
    [warning] = warnings(path, capsys)
    assert warning.startswith(f"{path}:3: redis.url: a secret written inline")
    assert "chmod 600" in warning and "${ENV_VAR}" in warning
    assert "inline-pw-4711" not in warning


def test_inline_secrets_under_secret_keys_and_in_odbc_strings_are_flagged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = secret_config(tmp_path, "redis://127.0.0.1:6379/0", 0o644)
    config = yaml.safe_load(path.read_text())
    config["sources"].append({**config["sources"][0], "name": "odbc", "url": "odbc:DSN=erp;UID=u;PWD=odbc-pw-1"})
    config["sources"][0]["params"] = {"api_token": "tok-123456"}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    found = warnings(path, capsys)
    assert [w.split(": a secret")[0].split(": ", 1)[1] for w in found] == ["sources[0].params.api_token",
                                                                        "sources[1].url"]
    assert not any("odbc-pw-1" in w or "tok-123456" in w for w in found)


@pytest.mark.parametrize(
    ("url", "file_mode"),
    [
        ("redis://straw:inline-pw-4711@127.0.0.1:6379/0", 0o600),  # readable by its owner only
        ("redis://straw:inline-pw-4711@127.0.0.1:6379/0", 0o640),  # and its group
        ("redis://straw:${STRAW_TEST_REDIS_PW:-x}@127.0.0.1:6379/0", 0o644),  # the secret is not in the file
        ("redis://straw@127.0.0.1:6379/0", 0o644),  # a user name is no secret
    ],
)
def test_no_warning_when_the_file_is_private_or_holds_no_inline_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], url: str, file_mode: int
) -> None:
    assert warnings(secret_config(tmp_path, url, file_mode), capsys) == []
