"""The gateway's Prometheus metrics (``GET /metrics``), in a registry of its own per app, so several
gateways in one process (tests) do not collide.

- ``frugalmesh_gateway_requests_total{status, stream}``: every chat request by its HTTP status;
- ``frugalmesh_gateway_request_seconds{stream}``: from the request's arrival to its last byte;
- ``frugalmesh_gateway_first_byte_seconds``: a stream's arrival to its response start (the first
  token or the result: what a streaming client waits before anything shows);
- ``frugalmesh_gateway_streams_open``: streams being relayed now.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds: the mesh's own overhead is milliseconds, a model call is seconds.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "frugalmesh_gateway_requests",
            "Chat completion requests by HTTP status.",
            ["status", "stream"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "frugalmesh_gateway_request_seconds",
            "Chat completion requests, arrival to last byte.",
            ["stream"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.first_byte = Histogram(
            "frugalmesh_gateway_first_byte_seconds",
            "Streamed requests, arrival to response start.",
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.streams_open = Gauge("frugalmesh_gateway_streams_open", "Streams being relayed.", registry=self.registry)

    def answered(self, status: int, stream: bool) -> None:
        self.requests.labels(str(status), "true" if stream else "false").inc()

    def finished(self, seconds: float, stream: bool) -> None:
        self.latency.labels("true" if stream else "false").observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
