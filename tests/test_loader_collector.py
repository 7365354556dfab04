"""The loader process's collector settings (loaders/collector.py)."""

from __future__ import annotations

import gc

from loaders import collector


def test_settle_freezes_the_start_and_spaces_young_passes_keeping_the_older_ones() -> None:
    before = gc.get_threshold()
    gc.unfreeze()
    try:
        started = [object() for _ in range(10)]  # a list: tracked by the collector
        assert any(o is started for o in gc.get_objects())
        collector.settle()
        assert gc.get_freeze_count() > 0
        assert all(o is not started for o in gc.get_objects())  # frozen: no generation walks it any more
        assert gc.get_threshold() == (collector.YOUNG_THRESHOLD, before[1], before[2])
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
