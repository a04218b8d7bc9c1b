"""Prometheus metrics for ``GET /metrics``: queue depth, batch sizes, latency by endpoint, rejections.

A batch is one forward pass: for chat batched continuously, ``op="prefill"`` counts the requests that
joined in one prefill and ``op="chat"`` the rows of one decode step.

Each app owns its registry (several apps in one process, as in tests, do not collide). Latency is
measured by an ASGI middleware from the first byte of the request to the last byte of the response,
so a streamed chat counts its whole stream.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServeMetrics:
    """The server's metrics in their own registry; a batching engine registers its queue with ``watch_queue``
    and reports through ``batch`` and ``rejected``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("mmstack_queue_depth", "Items waiting for a batch", ["model"], registry=r)
        self.in_flight = Gauge("mmstack_in_flight", "Items admitted (waiting or running)", ["model"], registry=r)
        self.batch_size = Histogram(
            "mmstack_batch_size", "Items per forward pass", ["model", "op"], buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_seconds = Histogram(
            "mmstack_batch_seconds", "Run time of one batch", ["model", "op"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.latency = Histogram(
            "mmstack_request_seconds", "Request latency", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.requests = Counter("mmstack_requests", "Requests answered", ["endpoint", "status"], registry=r)
        self.rejections = Counter("mmstack_rejected", "Requests refused or dropped", ["model", "reason"], registry=r)
        # labelled children, looked up once: ``labels()`` cost as much as a Prometheus update itself, several
        # times per request
        self._children: dict[tuple, Any] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, cached."""
        key = (id(metric), *labels)  # the metrics live as long as this object
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def watch_queue(self, model: str, pending: Callable[[], float], admitted: Callable[[], float]) -> None:
        """Queue depth and items in flight of ``model``, read from these callables when scraped (nothing to
        update per request)."""
        self.child(self.queue_depth, model).set_function(pending)
        self.child(self.in_flight, model).set_function(admitted)

    def batch(self, model: str, op: str, size: int, seconds: float) -> None:
        self.child(self.batch_size, model, op).observe(size)
        self.child(self.batch_seconds, model, op).observe(seconds)

    def rejected(self, model: str, reason: str) -> None:
        self.child(self.rejections, model, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class LatencyMiddleware:
    """ASGI middleware timing each HTTP request by route (unknown paths are pooled as "other")."""

    def __init__(self, app: Any, metrics: ServeMetrics, endpoints: set[str]) -> None:
        self.app, self.metrics, self.endpoints = app, metrics, endpoints

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in self.endpoints else "other"
        t0 = time.perf_counter()
        status = {"code": 500}

        async def timed_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self.metrics.child(self.metrics.latency, endpoint).observe(time.perf_counter() - t0)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            self.metrics.child(self.metrics.requests, endpoint, str(status["code"])).inc()
