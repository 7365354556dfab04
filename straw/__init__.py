"""straw: poll legacy systems, deliver canonical records to a Redis stream exactly once."""

__version__ = "0.1.0"
