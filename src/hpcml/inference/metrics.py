"""Prometheus metrics of one worker, in its own registry (no process-wide state to reset)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["Metrics"]

ENDPOINTS = frozenset({"/v1/predict", "/v1/model", "/health", "/ready", "/metrics"})
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self, *, max_batch: int, queue_depth: Callable[[], float]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "hpcml_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
            registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "hpcml_request_seconds", "Request latency (first byte in to last byte out)", ["endpoint"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        sizes, k = [], 1
        while k < max_batch:
            sizes.append(k)
            k *= 2
        self.batch_rows = Histogram(
            "hpcml_batch_rows", "Rows per forward pass", buckets=(*sizes, max_batch), registry=self.registry
        )
        depth = Gauge("hpcml_queue_depth", "Requests waiting for a forward pass", registry=self.registry)
        depth.set_function(queue_depth)

    def request(self, path: str, status: int, seconds: float) -> None:
        endpoint = path if path in ENDPOINTS else "other"  # unknown paths must not grow the label set
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
