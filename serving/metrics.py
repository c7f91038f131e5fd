"""Prometheus metrics of the ingress: requests by route and status, latency, batch sizes, queue depth.

Batches form in the tokenizer replicas; each reply carries its batch size, which the ingress records
here so that one ``/metrics`` scrape shows the whole picture for a single-ingress deployment.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)


class ServiceMetrics:
    """One registry per ingress replica (not the process-global one, so tests can build several)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "tokenizers_requests_total",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "tokenizers_request_seconds",
            "HTTP request latency by route",
            ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "tokenizers_batch_size",
            "requests per model call, by model and operation",
            ["model", "op"],
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "tokenizers_in_flight_requests",
            "requests accepted by the ingress and not yet answered (queue depth)",
            ["model"],
            registry=self.registry,
        )
        self.rejected = Counter(
            "tokenizers_rejected_total",
            "requests refused by backpressure or timeout",
            ["model", "reason"],
            registry=self.registry,
        )

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
