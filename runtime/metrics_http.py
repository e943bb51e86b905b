"""A process's `/metrics` endpoint, in Prometheus' text format, from `prometheus-client` itself.

Each process builds its own `CollectorRegistry` (no process-global registry: two servers in one
test process do not share counters) with the library's process, platform and GC collectors, and
serves it with the library's WSGI app on a thread of its own: a scrape never waits on the event
loop, and the event loop never waits on a scrape. `--metrics-port 0` (the default) builds none of it.

The port is as reachable as the others on `--host`, so its HTTP server is bounded as they are: at
most `MAX_CONNECTIONS` requests at once (one thread each; a connection past that is closed at once),
and a peer that sends nothing, or too slowly, loses its connection after `REQUEST_TIMEOUT_S`. The
request line and headers are bounded by the standard library's parser (414 and 431 past them).
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, make_wsgi_app

log = logging.getLogger(__name__)

# Latency buckets for figures measured in milliseconds (exported in seconds, Prometheus' unit):
# from a loopback round trip to a deadline.
LATENCY_BUCKETS_S = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0,
)  # fmt: skip
MAX_CONNECTIONS = 16
REQUEST_TIMEOUT_S = 5.0


def process_registry() -> CollectorRegistry:
    """A registry holding the process's own figures (CPU, memory, file descriptors, GC)."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


class _Handler(WSGIRequestHandler):
    timeout = REQUEST_TIMEOUT_S  # the socket's timeout while the request is read and answered

    def log_message(self, format: str, *args) -> None:
        log.debug("metrics: %s %s", self.address_string(), format % args)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True

    def __init__(self, *args, **kwargs):
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(*args, **kwargs)

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):  # every slot taken: this one is closed at once
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _Server6(_Server):
    address_family = socket.AF_INET6


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
    server_class = _Server6 if ":" in host else _Server
    server = make_server(host, port, make_wsgi_app(registry), server_class, handler_class=_Handler)
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    endpoint = MetricsEndpoint(server, thread)
    log.info("metrics endpoint: http://%s:%d/metrics", host, endpoint.port)
    return endpoint
