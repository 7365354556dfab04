"""The `loaders:` section: each mistake is one `file:line: key: message` line (exit 2), and a target's password
never shows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from straw.config_load import ConfigError, load_config
from tests.loader_helpers import loader_config
from tests.test_cli import invoke


def problems(tmp_path: Path, loaders: list[dict[str, Any]]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(loader_config(tmp_path, "redis://127.0.0.1:6379/0", loaders))
    return [str(p) for p in caught.value.problems]


GOOD = {"name": "wh", "kind": "sql", "url": "sqlite:///target.db", "streams": ["s"]}


@pytest.mark.parametrize(("change", "expected"), [
    ({"kind": "parquet"}, r"loaders\[0\].kind: unknown kind 'parquet'; use one of: 'sql', 'jsonl'"),
    ({"url": "mysql+nodriver://x@h/db"}, r"loaders\[0\].url: unknown database kind"),
    ({"url": "not a url"}, r"loaders\[0\].url: not a SQLAlchemy URL"),
    ({"batchsize": 5}, r"loaders\[0\].batchsize: unknown key `batchsize`; did you mean `batch_size`"),
    ({"tables": {"invoice": "inv"}}, r"loaders\[0\].tables.invoice: .*entity 'invoice'"),
    ({"max_deliveries": 0}, r"loaders\[0\].max_deliveries: "),
    ({"claim_idle": "soon"}, r"loaders\[0\].claim_idle: not a duration"),
    ({"streams": ["a", "b"], "dead_letter_stream": "all.dlq"}, r"loaders\[0\].dead_letter_stream: .*'\{stream\}.dlq'"),
    ({"streams": []}, r"loaders\[0\].streams: "),
])
def test_a_loader_mistake_is_one_line_naming_file_line_and_key(
    tmp_path: Path, change: dict[str, Any], expected: str
) -> None:
    found = problems(tmp_path, [{**GOOD, **change}])
    assert len(found) == 1
    import re

    assert re.search(r"straw\.yaml:\d+: " + expected, found[0]), found[0]


def test_two_loaders_with_one_name_are_refused(tmp_path: Path) -> None:
    [found] = problems(tmp_path, [GOOD, {**GOOD, "kind": "jsonl", "directory": "out", "url": None}][:1] * 2)
    assert "two loaders are named 'wh'" in found


def test_the_target_password_is_a_secret_and_paths_are_anchored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WH_PASSWORD", "s3cr3t-loader")
    config = load_config(loader_config(tmp_path, "redis://127.0.0.1:6379/0", [
        {**GOOD, "url": "postgresql+psycopg://loader:${WH_PASSWORD}@127.0.0.1:1/dwh"},
        {"name": "drop", "kind": "jsonl", "directory": "out", "streams": ["s"]},
    ]))
    from straw.redact import redact

    assert "s3cr3t-loader" not in redact(f"failed: {config.loaders[0].url}")  # type: ignore[union-attr]
    assert config.loaders[1].directory == (tmp_path / "out").resolve()  # type: ignore[union-attr]


def test_load_of_an_unknown_loader_names_the_known_ones(tmp_path: Path) -> None:
    path = loader_config(tmp_path, "redis://127.0.0.1:6379/0", [GOOD])
    result = invoke("load", "nope", "-c", str(path))
    assert result.exit_code == 2 and "no loader named 'nope'; loaders: wh" in result.output


def test_load_with_redis_down_is_one_line_and_exit_1(tmp_path: Path) -> None:
    from straw.local_redis import free_port

    path = loader_config(tmp_path, f"redis://:pw-not-shown@127.0.0.1:{free_port()}/0", [GOOD])
    result = invoke("load", "wh", "--once", "-c", str(path))
    assert result.exit_code == 1, result.output
    assert "redis unreachable" in result.output and "Traceback" not in result.output
    assert "pw-not-shown" not in result.output
