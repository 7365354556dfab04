"""Prometheus metrics for `straw run`: the outbox's state at each scrape, and the runner's poll timings.

The outbox already holds what `straw status` shows (positions, backlog, dead
letters, errors), written by the poller and by the relay process alike, so a
scrape reads it there rather than have both processes keep counters: one
short-lived read-only connection per scrape, which WAL lets run beside the
writers without blocking them. Only what the outbox does not keep (how long a
poll takes, how often one fails; what the relay published and how long each
round took, which the relay child reports per round) is counted in this process.

Labels are source and stream names only: both are plain names checked by the
configuration, never a URL, so no secret can reach a label.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from adapters.db.settle import Kept, UnreadableMemo
from outbox.store import oldest_pending_query, runs, waiting_sum
from straw.publish_history import PublishHistory
from straw.status_report import age_seconds

if TYPE_CHECKING:
    from straw.config import Config
    from straw.web import LeaseView

log = structlog.get_logger("straw.metrics")

# A poll of a large snapshot or a slow web UI takes minutes, not the library's default 10 s ceiling.
POLL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# A publish round is one script call of up to `relay.batch_size` records: milliseconds, seconds when Redis is far.
PUBLISH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class OutboxCollector(Collector):
    """Yields the outbox's per-source and per-stream state, read afresh at each scrape."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def describe(self) -> Iterable[Metric]:
        # Names only, so registering checks them without opening the outbox.
        return _Families().all()

    def collect(self) -> Iterable[Metric]:
        families = _Families()
        if not self.path.exists():
            return []
        try:
            self._read(families)
        except sqlite3.Error as exc:
            # A scrape must not fail the run; the missing series are what an alert sees.
            log.warning("metrics: outbox not readable", error=str(exc))
            return []
        return families.all()

    def _read(self, families: _Families) -> None:
        uri = self.path.resolve().as_uri() + "?mode=ro"
        with closing(sqlite3.connect(uri, uri=True, timeout=5.0, isolation_level=None)) as db:
            db.execute("BEGIN")  # one snapshot for every query of this scrape
            dead = dict(db.execute("SELECT source, count(*) FROM dead_letters GROUP BY source").fetchall())
            for source, polled_at, rows_read, error in db.execute(
                "SELECT source, polled_at, rows_read, error FROM positions ORDER BY source"
            ):
                families.rows_read.add_metric([source], rows_read)
                families.error.add_metric([source], 0 if error is None else 1)
                if polled_at is not None:
                    families.polled_at.add_metric([source], dt.datetime.fromisoformat(polled_at).timestamp())
                dead.setdefault(source, 0)
            for source, count in sorted(dead.items()):
                families.dead_letters.add_metric([source], count)
            # A row holds `n` records (outbox/store.py); retained counts whole published rows.
            with_runs = runs(db)
            n = "r.n" if with_runs else "1"
            oldest_pending = oldest_pending_query(with_runs)
            for stream, seq, error, backlog, retained in db.execute(
                "SELECT stream, published_seq, error, "
                f"(SELECT coalesce(sum({waiting_sum(n, 'r.seq', 's.published_seq')}), 0) FROM records r "
                "WHERE r.stream = s.stream AND r.seq > s.published_seq), "
                f"(SELECT coalesce(sum({n}), 0) FROM records r WHERE r.stream = s.stream AND r.seq <= s.published_seq) "
                "FROM streams s ORDER BY stream"
            ).fetchall():
                families.published_seq.add_metric([stream], seq)
                families.backlog.add_metric([stream], backlog)
                families.stream_error.add_metric([stream], 0 if error is None else 1)
                oldest = db.execute(oldest_pending, (stream, seq)).fetchone() if backlog else None
                families.oldest_age.add_metric([stream], age_seconds(oldest[0] if oldest else None) or 0.0)
                families.retained.add_metric([stream], retained)
            if _has_table(db, "rollbacks"):  # an outbox from before rollback detection has none yet
                for stream, count, open_ in db.execute(
                    "SELECT stream, count(*), sum(repaired_at IS NULL) FROM rollbacks GROUP BY stream ORDER BY stream"
                ):
                    families.rollbacks.add_metric([stream], count)
                    families.rollback_open.add_metric([stream], open_)
            if _has_table(db, "memos"):  # an outbox from before the gap watch was kept has none yet
                _settle_gaps(families, db.execute("SELECT source, memo FROM memos ORDER BY source").fetchall())
            pages, page = (db.execute(f"PRAGMA {name}").fetchone()[0] for name in ("page_count", "page_size"))
            families.outbox_bytes.add_metric([], pages * page)
            db.execute("COMMIT")


class _Families:
    def __init__(self) -> None:
        self.rows_read = CounterMetricFamily(
            "straw_source_rows_read", "Rows read from the source into the outbox.", labels=["source"]
        )
        self.polled_at = GaugeMetricFamily(
            "straw_source_last_poll_timestamp_seconds", "When the source was last polled (Unix time).",
            labels=["source"],
        )
        self.error = GaugeMetricFamily(
            "straw_source_error", "1 if the source's last poll failed, else 0.", labels=["source"]
        )
        self.dead_letters = GaugeMetricFamily(
            "straw_dead_letters", "Dead letters held in the outbox.", labels=["source"]
        )
        self.backlog = GaugeMetricFamily(
            "straw_stream_backlog_records", "Records in the outbox not yet published to the stream.",
            labels=["stream"],
        )
        self.published_seq = GaugeMetricFamily(
            "straw_stream_published_seq", "Outbox sequence number of the last record published to the stream.",
            labels=["stream"],
        )
        self.stream_error = GaugeMetricFamily(
            "straw_stream_error", "1 if the relay's last publish to the stream failed (Redis down?), else 0.",
            labels=["stream"],
        )

        self.oldest_age = GaugeMetricFamily(
            "straw_stream_oldest_unpublished_age_seconds",
            "Age of the oldest record waiting to be published to the stream (since observed); 0 when none waits.",
            labels=["stream"],
        )

        self.retained = GaugeMetricFamily(
            "straw_stream_retained_records",
            "Published records kept in the outbox to repair a rollback of the bus (outbox.retain).",
            labels=["stream"],
        )
        self.rollbacks = CounterMetricFamily(
            "straw_stream_rollbacks",
            "Times the bus checkpoint was found below the seq this outbox published (the bus lost records).",
            labels=["stream"],
        )
        self.rollback_open = GaugeMetricFamily(
            "straw_stream_rollback_open",
            "1 while a rollback is being repaired or its stream is stopped on a gap (see straw status), else 0.",
            labels=["stream"],
        )
        self.outbox_bytes = GaugeMetricFamily("straw_outbox_bytes", "Size of the outbox file (its WAL apart).")
        self.gaps_given_up = CounterMetricFamily(
            "straw_settle_gaps_given_up",
            "Id gaps a settle window gave up (rolled-back transactions, skipped sequence values).",
            labels=["source"],
        )
        self.gaps_watched = GaugeMetricFamily(
            "straw_settle_gaps_watched", "Given-up id gaps still watched for a late commit.", labels=["source"]
        )
        self.late_rows = CounterMetricFamily(
            "straw_settle_late_rows",
            "Rows committed into a given-up id gap, delivered late: a transaction outlasted the settle window.",
            labels=["source"],
        )

    def all(self) -> list[Metric]:
        return [self.rows_read, self.polled_at, self.error, self.dead_letters,
                self.backlog, self.published_seq, self.stream_error, self.oldest_age,
                self.retained, self.rollbacks, self.rollback_open, self.outbox_bytes,
                self.gaps_given_up, self.gaps_watched, self.late_rows]


def _settle_gaps(families: _Families, memos: Iterable[tuple[str, str]]) -> None:
    """The settle window's gap watch of incrementing sources, as last committed (`adapters/db/settle.py`)."""
    now = time.time()
    for source, memo in memos:
        try:
            kept = Kept.parse(memo)
        except UnreadableMemo:
            continue  # the source's own log line says so
        families.gaps_given_up.add_metric([source], kept.given_up)
        families.gaps_watched.add_metric([source], kept.watched(now))
        families.late_rows.add_metric([source], kept.found_late)


def _has_table(db: sqlite3.Connection, name: str) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() is not None


@dataclass
class MetricsServer:
    server: WSGIServer
    thread: threading.Thread

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5.0)


class Metrics:
    """One run's registry: the outbox collector and the poll timings the runner records.

    A registry of its own, not the library's global one, so two runs in one
    process (the tests) never register the same name twice.
    """

    def __init__(self, outbox_path: Path, sources: Sequence[str], streams: Sequence[str] = ()) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(OutboxCollector(outbox_path))
        self.poll_seconds = Histogram(
            "straw_poll_duration_seconds", "Time a poll took, failed ones included.", ["source"],
            buckets=POLL_BUCKETS, registry=self.registry,
        )
        self.poll_errors = Counter(
            "straw_poll_errors", "Polls that failed (the position did not move).", ["source"], registry=self.registry
        )
        self.published_records = Counter(
            "straw_stream_published_records", "Records this run published to the stream.", ["stream"],
            registry=self.registry,
        )
        self.publish_seconds = Histogram(
            "straw_relay_publish_seconds", "Time a publish round (one batch, one script call) took.", ["stream"],
            buckets=PUBLISH_BUCKETS, registry=self.registry,
        )
        self.history = PublishHistory()
        for name in sources:  # a source that has not polled yet shows zeros rather than no series
            self.poll_seconds.labels(name)
            self.poll_errors.labels(name)
        for stream in streams:
            self.published_records.labels(stream)
            self.publish_seconds.labels(stream)

    def observe(self, source: str, seconds: float, *, failed: bool) -> None:
        self.poll_seconds.labels(source).observe(seconds)
        if failed:
            self.poll_errors.labels(source).inc()

    def published(self, stream: str, records: int, seconds: float) -> None:
        """The relay's report of a round: `records` new in `stream`, in `seconds`."""
        self.published_records.labels(stream).inc(records)
        self.publish_seconds.labels(stream).observe(seconds)
        self.history.add(stream, records)

    def serve(self, host: str, port: int, config: Config, lease: LeaseView | None = None) -> MetricsServer:
        """Serve /metrics, the health checks and the status page from a daemon thread; OSError when the
        address cannot be bound. `lease`: who holds each source's lease (none configured when not given)."""
        from straw.web import make_app, serve  # the page and its server: only when metrics are on

        server, thread = serve(host, port, make_app(config, self, lease))
        return MetricsServer(server, thread)

