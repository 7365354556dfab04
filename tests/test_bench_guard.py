"""The CI bench guard fails on a cost that grows, names the measure and both figures, and passes today's."""

from __future__ import annotations

from bench.guard import Check


def test_a_ratio_below_its_floor_fails_and_says_both_figures() -> None:
    # Today's snapshot diff: flat (ratio ~1). Made quadratic, 10x the rows takes ~100x the time: ratio ~0.1.
    slow = Check("snapshot_diff_rate_200k_vs_20k", 19_000.0, "20k", 190_000.0, 0.1, floor=0.4)
    assert not slow.passed
    assert slow.line() == ("FAIL snapshot_diff_rate_200k_vs_20k: 19,000.0 vs 20k 190,000.0 = ratio 0.10 "
                           "(must be >= 0.4)")
    assert slow.as_json()["passed"] is False
    assert Check("snapshot_diff_rate_200k_vs_20k", 180_000.0, "20k", 190_000.0, 0.95, floor=0.4).passed


def test_a_ratio_above_its_ceiling_fails() -> None:
    # An idle poll that scans: 100x the rows, ~100x the time.
    scan = Check("idle_poll_ms_200k_vs_2k", 120.0, "2k", 1.2, 100.0, ceiling=3.0)
    assert not scan.passed and "(must be <= 3.0)" in scan.line()
    assert Check("idle_poll_ms_200k_vs_2k", 1.3, "2k", 1.2, 1.08, ceiling=3.0).passed
