"""A process's `/metrics` endpoint, in Prometheus' text format, from `prometheus-client` itself.

Each process builds its own `CollectorRegistry` (no process-global registry: two servers in one
test process do not share counters) with the library's process, platform and GC collectors, and
serves it on the library's HTTP server, a thread of its own: a scrape never waits on the event
loop, and the event loop never waits on a scrape. `--metrics-port 0` (the default) builds none of it.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, start_http_server

log = logging.getLogger(__name__)

# Latency buckets for figures measured in milliseconds (exported in seconds, Prometheus' unit):
# from a loopback round trip to a deadline.
LATENCY_BUCKETS_S = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0,
)  # fmt: skip


def process_registry() -> CollectorRegistry:
    """A registry holding the process's own figures (CPU, memory, file descriptors, GC)."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


@dataclasses.dataclass
class MetricsEndpoint:
    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5.0)


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> MetricsEndpoint:
    """`registry` on http://host:port/metrics; OSError when the port cannot be bound."""
    server, thread = start_http_server(port, addr=host, registry=registry)
    endpoint = MetricsEndpoint(server, thread)
    log.info("metrics endpoint: http://%s:%d/metrics", host, endpoint.port)
    return endpoint
