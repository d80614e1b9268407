"""Prometheus metrics of one teacher server (requests, rows, latency, errors, batching).

Each server owns a registry, so several servers can live in one process (tests,
benchmarks) without clashing; the HTTP side port exposes it at /metrics.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
ROW_BUCKETS = (1, 8, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 65536)


class TeacherMetrics:
    def __init__(self, teacher_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = {"teacher": teacher_name}
        self.requests = Counter(
            "teacher_requests", "RPCs handled, by method and gRPC status code", ["method", "code"],
            registry=self.registry,
        )
        self.rows = Counter("teacher_rows", "Rows answered, by method", ["method"], registry=self.registry)
        self.latency = Histogram(
            "teacher_request_seconds", "Time from receiving a request to its reply", ["method"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.batch_rows = Histogram(
            "teacher_batch_rows", "Rows per computed (possibly merged) batch", ["kind"],
            buckets=ROW_BUCKETS, registry=self.registry,
        )
        self.batches = Counter("teacher_batches", "Computed batches, by kind", ["kind"], registry=self.registry)
        self.merged = Counter(
            "teacher_merged_requests", "Requests computed together with others in one batch", ["kind"],
            registry=self.registry,
        )
        self.in_flight = Gauge("teacher_requests_in_flight", "Requests being handled", registry=self.registry)
        info = Gauge("teacher_info", "The served teacher", list(labels), registry=self.registry)
        info.labels(**labels).set(1)

    def watch_kept_graphs(self, graphs) -> None:
        """Expose how many answers' graphs ``graphs`` (a ``KeptGraphs``) keeps, read at each scrape."""
        kept = Gauge("teacher_kept_graphs", "Answers whose graph is kept for their AnswerVJP", registry=self.registry)
        kept.set_function(lambda: len(graphs))

    def observe_batch(self, kind: str, n_requests: int, n_rows: int) -> None:
        self.batches.labels(kind).inc()
        self.batch_rows.labels(kind).observe(n_rows)
        if n_requests > 1:
            self.merged.labels(kind).inc(n_requests)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
