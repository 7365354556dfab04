"""The garbage collector of a loader process, set once it started, for many short-lived records.

A record is a few dicts and objects, freed by reference counting as soon as its batch is acked; the cyclic
collector finds nothing in them, but with the default settings it runs every 700 allocations (a few records)
and its full passes walk every object of the start (modules, the config, SQLAlchemy's metadata). Measured in
bench/README.md (Session 5, loader-speed): about a third of the typed parse per record.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 20_000  # allocations between two young passes: a few batches' worth of records, not a few records


def settle() -> None:
    """Freeze what the start made (never walked again) and space the young passes out."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
