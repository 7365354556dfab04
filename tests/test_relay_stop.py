"""The relay child stops cleanly when its stdin closes: how `straw run` stops it on Windows (no SIGTERM there);
and the parent's wakes (after each outbox commit) never block it, whether the child hangs or is gone."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from straw.config_load import load_config
from straw.relay_process import RelayProcess
from tests.bigtable import big_table, items_config


def _started(tmp_path: Path, redis_url: str, stream_name: str) -> RelayProcess:
    config = load_config(items_config(tmp_path, db_url=big_table(tmp_path / "legacy.db", 1), redis_url=redis_url,
                                      stream=stream_name))
    relay = RelayProcess(config)
    relay.start()
    return relay


def test_closing_the_relay_childs_stdin_stops_it_with_exit_code_0(
    tmp_path: Path, redis_url: str, stream_name: str
) -> None:
    relay = _started(tmp_path, redis_url, stream_name)
    assert relay.is_alive()
    relay.shutdown(timeout=20.0, by_stdin=True)
    assert not relay.is_alive()
    assert relay._process is not None and relay._process.returncode == 0
    assert relay.error() is None  # a stopped run reports no relay error


def test_wakes_never_block_when_the_child_stops_reading_and_drain_still_arrives(
    tmp_path: Path, redis_url: str, stream_name: str
) -> None:
    relay = _started(tmp_path, redis_url, stream_name)
    process = relay._process
    assert process is not None and relay._stdin is not None
    process.send_signal(signal.SIGSTOP)  # a hung child: its stdin fills up and stays full
    try:
        for _ in range(40_000):  # 200 kB of wakes: three times a pipe's 64 kB
            relay.wake()
        try:
            os.write(relay._stdin, b"wake\n")  # a wake's size: a page's last bytes may take a shorter line
            full = False
        except BlockingIOError:
            full = True
        assert full  # the wakes above did meet a full pipe, and returned all the same
    finally:
        process.send_signal(signal.SIGCONT)
    relay.drain()  # after the wakes, in order: the child reads them all, then drains and exits
    relay.join(timeout=30)
    assert not relay.is_alive()
    assert process.returncode == 0
    assert relay.error() is None
    relay.wake()  # a child that has exited: a wake is a no-op, never an error
    relay.shutdown()


def test_a_wake_after_the_child_was_killed_is_a_no_op(tmp_path: Path, redis_url: str, stream_name: str) -> None:
    relay = _started(tmp_path, redis_url, stream_name)
    process = relay._process
    assert process is not None
    process.kill()
    process.wait(10)
    for _ in range(3):
        relay.wake()  # a broken pipe: swallowed, as `drain` swallows it
    relay.drain()
    assert relay.error() == f"relay process exited with code {-signal.SIGKILL}"
    relay.shutdown()
