"""Prometheus metrics of a running `straw load` (`loaders[].metrics`): how much it applied, how far behind
its streams it is, when its last batch went through.

The counts are the loop's own tally, read at each scrape (nothing is added to the loop for them); each batch
is timed around the target's apply, and its top `seq` per stream noted. How far the bus is ahead is asked at
the scrape, over a connection of the scrape's own (the consumer's belongs to the loop's thread).

Labels are the loader's and the streams' names: plain names the configuration checked, never a URL.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from wsgiref.simple_server import WSGIServer

import structlog
from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from loaders.records import Record
from loaders.repair import newest_seq
from loaders.sdk import Apply, Failed, Tally
from straw.bus_reach import with_bus
from straw.config import Config
from straw.config_loaders import AnyLoaderSpec, LoaderMetricsSpec

log = structlog.get_logger("straw.loader.metrics")

# A batch is one target transaction (or one write and fsync): milliseconds, seconds on a slow warehouse.
BATCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BUS_TIMEOUT = 2.0  # a scrape must answer while the bus hangs: a scraper's timeout is a few seconds


class MetricsPortUnavailable(Exception):
    """The loader's metrics port cannot be bound: the loader does not start (an unwatched loader is worse)."""


class LoaderMetrics(Collector):
    def __init__(self, config: Config, spec: AnyLoaderSpec) -> None:
        self.config, self.spec = config, spec
        self.tally = Tally()  # handed to `consume`, which counts into it
        self.applied: dict[str, int] = {}  # stream -> highest seq applied (the target's at start, then each batch)
        self.last_batch: float | None = None
        self.registry = CollectorRegistry(auto_describe=True)
        self.batch_seconds = Histogram(
            "straw_loader_batch_seconds", "time the target took to apply a batch (one transaction, or one write "
            "and fsync)", ["loader"], buckets=BATCH_BUCKETS, registry=self.registry).labels(spec.name)
        self.registry.register(self)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def metered(self, apply: Apply) -> Apply:
        """`apply`, timed, with each batch's top seq per stream noted once it returned."""

        def timed(records: Sequence[Record]) -> Sequence[Failed]:
            began = time.monotonic()
            failed = apply(records)
            self.batch_seconds.observe(time.monotonic() - began)
            # Records of a stream come in its order, but a retry may follow newer ones: keep the highest.
            tops = {r.stream: r.seq for r in records}
            for stream, seq in tops.items():
                if seq > self.applied.get(stream, 0):
                    self.applied[stream] = seq
            self.last_batch = time.time()
            return failed

        return timed

    def describe(self) -> Iterable[Metric]:
        return []  # the families depend on what the bus answers: checked at each collect instead

    def collect(self) -> Iterable[Metric]:
        name, tally = self.spec.name, self.tally
        for metric, value, text in (
            ("straw_loader_records_applied", tally.applied, "records applied and acked (duplicates skipped "
             "by the target included)"),
            ("straw_loader_deliveries_failed", tally.failed, "deliveries the target refused (each retry counts)"),
            ("straw_loader_dead_letters", tally.dead_letters, "records moved to a dead-letter stream"),
            ("straw_loader_batches", tally.batches, "batches handed to the target"),
        ):
            family = CounterMetricFamily(metric, text, labels=["loader"])
            family.add_metric([name], value)
            yield family
        last = GaugeMetricFamily("straw_loader_last_batch_timestamp_seconds",
                                 "when the target last returned a batch (Unix time)", labels=["loader"])
        if self.last_batch is not None:
            last.add_metric([name], self.last_batch)
        yield last
        applied = GaugeMetricFamily("straw_loader_applied_seq", "the highest seq of a stream this run applied",
                                    labels=["loader", "stream"])
        for stream, seq in sorted(self.applied.items()):
            applied.add_metric([name, stream], seq)
        yield applied
        newest = self._newest()
        up = GaugeMetricFamily("straw_loader_bus_up", "1 if the scrape reached the bus", labels=["loader"])
        up.add_metric([name], 1 if newest is not None else 0)
        yield up
        on_bus = GaugeMetricFamily("straw_loader_stream_newest_seq", "the seq of the stream's newest record on "
                                   "the bus", labels=["loader", "stream"])
        behind = GaugeMetricFamily("straw_loader_lag_records", "records on the bus this loader has not applied "
                                   "yet: newest seq minus applied seq",
                                   labels=["loader", "stream"])
        for stream, seq in sorted((newest or {}).items()):
            on_bus.add_metric([name, stream], seq)
            if stream in self.applied:
                behind.add_metric([name, stream], max(seq - self.applied.get(stream, 0), 0))
        yield on_bus
        yield behind

    def _newest(self) -> dict[str, int] | None:
        found = with_bus(self.config, lambda bus: {s: newest_seq(bus, s) for s in self.spec.streams}, BUS_TIMEOUT)
        if isinstance(found, str):
            log.info("metrics: bus unreachable", error=found)
            return None
        return found

    def serve(self, spec: LoaderMetricsSpec) -> None:
        """Listen on the spec's host and port from a daemon thread; MetricsPortUnavailable if it cannot bind."""
        try:
            self._server, self._thread = start_http_server(spec.port, spec.host, self.registry)
        except OSError as exc:
            raise MetricsPortUnavailable(
                f"cannot serve metrics on {spec.host}:{spec.port} ({exc.strerror or exc}): another process has "
                "it, or the address is not this host's; choose another `metrics.port` for this loader") from exc

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
