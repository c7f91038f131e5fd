"""Prometheus metrics of the ingress: requests by route, model and status, latency, batch sizes,
queue depth.

Batches form in the tokenizer replicas; each reply carries its batch size, which the ingress records
here so that one ``/metrics`` scrape shows the whole picture for a single-ingress deployment. The
``model`` label takes served model names only (a URL naming anything else counts as ``unknown``), so
a client cannot grow the number of series.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

NO_MODEL = ""  # routes without a {model} (an empty label is the same as no label in Prometheus)
UNKNOWN_MODEL = "unknown"  # a {model} that is not served


class ServiceMetrics:
    """One registry per ingress replica (not the process-global one, so tests can build several)."""

    def __init__(self, served_models: Iterable[str] = ()) -> None:
        self.served_models = frozenset(served_models)
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "tokenizers_requests_total",
            "HTTP requests by route, served model and status",
            ["route", "model", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "tokenizers_request_seconds",
            "HTTP request latency by route and served model",
            ["route", "model"],
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

    def model_label(self, model: str | None) -> str:
        """The ``model`` label of a request: its served name, ``unknown``, or empty without one."""
        if model is None:
            return NO_MODEL
        return model if model in self.served_models else UNKNOWN_MODEL

    def observe_request(self, route: str, model: str | None, status: int, seconds: float) -> None:
        label = self.model_label(model)
        self.requests.labels(route, label, str(status)).inc()
        self.latency.labels(route, label).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
