"""The relay child stops cleanly when its stdin closes: how `straw run` stops it on Windows (no SIGTERM there)."""

from __future__ import annotations

from pathlib import Path

from straw.config_load import load_config
from straw.relay_process import RelayProcess
from tests.bigtable import big_table, items_config


def test_closing_the_relay_childs_stdin_stops_it_with_exit_code_0(
    tmp_path: Path, redis_url: str, stream_name: str
) -> None:
    config = load_config(items_config(tmp_path, db_url=big_table(tmp_path / "legacy.db", 1), redis_url=redis_url,
                                      stream=stream_name))
    relay = RelayProcess(config)
    relay.start()
    assert relay.is_alive()
    relay.shutdown(timeout=20.0, by_stdin=True)
    assert not relay.is_alive()
    assert relay._process is not None and relay._process.returncode == 0
    assert relay.error() is None  # a stopped run reports no relay error
