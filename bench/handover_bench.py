"""Takeover measures (issue 11): how fast, and in how much memory, a node taking a stream over rebuilds
the keyed state of a snapshot source from the stream (`straw/handover.py`).

- `takeover_rebuild_entries_per_s` / `takeover_rebuild_peak_rss_mb`: a stream holding a first
  listing of 1,000,000 rows (quick: 100,000), then 1 % updated and 0.5 % deleted, as a snapshot
  source publishes them; one takeover (read the stream, stage it, apply it in the takeover's
  transaction) in a fresh process, whose peak RSS is the process's. Baseline: the same on
  100,000 rows (quick: 10,000). Flat RSS means memory does not grow with the stream. The log
  line also gives the CPU seconds and how long the state took to write (in transactions of 20,000
  keys, so the outbox's write lock is never held long).
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import redis

from bench.services import Bench, log
from outbox.store import Outbox
from straw.handover import Handed, rebuild
from straw.records import Envelope, source_uri

ROOT = Path(__file__).resolve().parent.parent
URI = source_uri("bench", "items")


def _fill(client: redis.Redis, stream: str, rows: int) -> int:
    """The stream as a snapshot source leaves it: every row, then 1 % changed, 0.5 % deleted."""
    upserted = Envelope(source=URI, entity="item", op="upserted", time="2026-12-01T00:00:00Z").encode
    deleted = Envelope(source=URI, entity="item", op="deleted", time="2026-12-01T00:00:00Z").encode
    changes = [(n, 1) for n in range(1, rows + 1)] + [(n, 2) for n in range(7, rows + 1, 100)]
    changes += [(n, 0) for n in range(3, rows + 1, 200)]
    pipe = client.pipeline(transaction=False)
    for seq, (n, version) in enumerate(changes, 1):
        position = f"[{version},{n}]"
        data = {"id": n, "customer": f"customer {n % 977}", "amount": f"{n % 10_000}.{version}5", "status": "open"}
        event = upserted(str(n), position, data) if version else deleted(str(n), position, {"id": n})
        pipe.xadd(stream, {"seq": seq, "pos": position, "event": event})
        if seq % 5_000 == 0:
            pipe.execute()
    pipe.execute()
    return len(changes)


def _peak_rss_mb(reset: bool = False) -> float:
    """This process's peak RSS. A child inherits its parent's peak at the fork (the parent filled the
    stream: 190 MB for 1M entries), so the worker resets it first (Linux: clear_refs 5)."""
    try:
        if reset:
            Path("/proc/self/clear_refs").write_text("5")
            return 0.0
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _step(url: str, stream: str, outbox_path: Path) -> dict[str, Any]:
    """One takeover's rebuild in this (fresh) process."""
    _peak_rss_mb(reset=True)
    client = redis.Redis.from_url(url)
    outbox = Outbox(outbox_path)
    try:
        started, cpu = time.perf_counter(), time.process_time()
        handover = rebuild(client, stream, 1, [Handed("items", URI, keyed=True, swept=False, key=("id",))])
        assert handover is not None
        outbox.stage_handover(handover)
        staged = time.perf_counter()
        outbox.take_over(stream, 1, {}, ["items"], handover)
        done = time.perf_counter()
    finally:
        outbox.close()
        client.close()
    return {"seconds": done - started, "written": done - staged, "cpu": time.process_time() - cpu,
            "events": handover.events, "keys": handover.keys,
            "peak_rss_mb": _peak_rss_mb()}


def _takeover(bench: Bench, rows: int) -> tuple[float, float]:
    stream = bench.stream("takeover")
    work = bench.workdir("takeover")
    try:
        entries = _fill(bench.redis, stream, rows)
        done = subprocess.run(
            [sys.executable, "-m", "bench.handover_bench", bench.redis_url, stream, str(work / "outbox.db")],
            cwd=ROOT, capture_output=True, text=True, check=False, timeout=1800,
        )
        if done.returncode != 0:
            raise RuntimeError(f"takeover failed:\n{done.stderr[-2000:]}")
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        bench.drop(stream)
        shutil.rmtree(work, ignore_errors=True)
    if result["events"] != entries or result["keys"] != rows - len(range(3, rows + 1, 200)):
        raise RuntimeError(f"the rebuild read {result['events']} events and kept {result['keys']} keys")
    rate = entries / result["seconds"]
    log(f"takeover of a stream of {entries:,} entries ({result['keys']:,} keys): {rate:,.0f} entries/s, "
        f"{result['cpu']:.1f} s CPU, the state written in {result['written']:.1f} s (transactions of "
        f"20,000 keys), peak RSS {result['peak_rss_mb']:.0f} MB")
    return rate, float(result["peak_rss_mb"])


def takeover_rebuild(bench: Bench, big: int, small: int) -> list[dict[str, Any]]:
    small_rate, small_rss = _takeover(bench, small)
    rate, rss = _takeover(bench, big)
    label = f"{small // 1000}k"
    return [
        {"measure": "takeover_rebuild_entries_per_s", "value": rate, "unit": "entries/s",
         "baseline": f"takeover_rebuild_entries_per_s_{label}", "baseline_value": small_rate},
        {"measure": "takeover_rebuild_peak_rss_mb", "value": rss, "unit": "MB",
         "baseline": f"takeover_rebuild_peak_rss_mb_{label}", "baseline_value": small_rss},
    ]


if __name__ == "__main__":
    # `python -m bench.handover_bench REDIS_URL STREAM OUTBOX`: the worker of `_takeover`.
    print(orjson.dumps(_step(sys.argv[1], sys.argv[2], Path(sys.argv[3]))).decode())
