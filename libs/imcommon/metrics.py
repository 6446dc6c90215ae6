"""Prometheus metrics: one registry per process (no global default registry), the
RPC metrics every service has, and an HTTP endpoint on `metrics_port`."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


class Metrics:
    """The metrics of one process. Services add their own with `counter()`,
    `gauge()` and `histogram()`; names get the `im_` prefix."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.registry = CollectorRegistry()
        self.rpc_server_handled = self.counter(
            "rpc_server_handled", "RPCs served, by method and status code", ["method", "code"]
        )
        self.rpc_server_latency = self.histogram(
            "rpc_server_latency_seconds", "Server-side RPC latency", ["method"]
        )
        self.rpc_client_handled = self.counter(
            "rpc_client_handled", "RPCs made to other services, by method and code",
            ["method", "code"],
        )  # fmt: skip
        self.rpc_client_latency = self.histogram(
            "rpc_client_latency_seconds", "Client-side RPC latency", ["method"]
        )
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def counter(self, name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
        return Counter(f"im_{name}", doc, list(labels), registry=self.registry)

    def gauge(self, name: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
        return Gauge(f"im_{name}", doc, list(labels), registry=self.registry)

    def histogram(
        self,
        name: str,
        doc: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> Histogram:
        return Histogram(f"im_{name}", doc, list(labels), registry=self.registry, buckets=buckets)

    def serve(self, host: str, port: int) -> int:
        """Serves /metrics over HTTP from a thread; returns the bound port."""
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._server.server_port)

    def close(self) -> None:
        """Stops the HTTP endpoint. Idempotent."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
