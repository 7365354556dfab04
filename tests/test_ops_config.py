"""The configuration of retention and logs: mistakes are one `file:line: key: message` line."""

from __future__ import annotations

from pathlib import Path

import pytest

from straw.config_load import ConfigError, load_config
from tests.test_config import BASE, write


def problem_of(tmp_path: Path, extra: str) -> str:
    path = write(tmp_path, BASE + extra)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    [problem] = caught.value.problems
    return str(problem).removeprefix(f"{path}:")


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("retention:\n  streams:\n    erp.order: 2h\n",
         "27: retention.streams.erp.order: no source publishes to stream 'erp.order'; use one of: erp.orders"),
        ("retention:\n  max_age: 0\n", "26: retention.max_age: Input should be greater than 0"),
        ("retention:\n  max_age: 40d\n", "26: retention.max_age: not a duration: '40d'"),
        ("retention:\n  interval: 100ms\n", "26: retention.interval: Input should be greater than or equal to 1"),
        ("log:\n  format: jsonl\n", "26: log.format: Input should be 'console', 'json' or 'keyvalue'"),
        ("log:\n  polls: every\n", "26: log.polls: Input should be 'changes' or 'all'"),
    ],
)
def test_retention_and_log_mistakes_are_one_line(tmp_path: Path, extra: str, expected: str) -> None:
    assert problem_of(tmp_path, extra).startswith(expected)


def test_each_stream_gets_the_common_max_age_or_its_own(tmp_path: Path) -> None:
    text = BASE + (
        "  - {name: other, url: 'sqlite:///b.db', table: T, mode: incrementing, incrementing_column: N,\n"
        "     entity: order, stream: erp.audit}\n"
        "retention:\n  max_age: 168h\n  streams:\n    erp.audit: 720h\n"
    )
    config = load_config(write(tmp_path, text))
    assert config.stream_max_ages() == {"erp.orders": 168 * 3600.0, "erp.audit": 720 * 3600.0}
    assert load_config(write(tmp_path, BASE)).stream_max_ages() == {}
