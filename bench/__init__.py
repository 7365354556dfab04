"""Benchmarks: `python bench/run.py [--quick] [MEASURE…]` (see bench/README.md)."""
