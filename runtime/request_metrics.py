"""Requests answered, by type, transport and outcome, with their latency: one set of metrics for the
single server and the fleet broker, fed by their `transport.admission.Observer` hook.

Labels stay bounded whatever peers send: the request type is one of the protocol's (a message
refused before its header was read is `unparsed`), the transport is read off the wire edge (the
gateways' robots are named `@json/...` and `@openpi/...`), the outcome is `ok` or one of the
documented error codes. No robot id, peer or prompt becomes a label: 4096 robots make no more
series than one.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from runtime.metrics_http import LATENCY_BUCKETS_S
from transport.errors import ERROR_CODES
from transport.messages import REPLY_TYPE

TRANSPORTS = ("zmq", "json", "openpi", "internal")


def transport_of(internal: bool, robot: str) -> str:
    """zmq for the public ROUTER; on the internal one, the gateway whose connection it is (its own
    probes, `@health` and `@gateway`, are `internal`)."""
    if not internal:
        return "zmq"
    if robot.startswith("@json/"):
        return "json"
    if robot.startswith("@openpi/"):
        return "openpi"
    return "internal"


class RequestMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.requests = Counter(
            "pi05_requests",
            "Requests answered, by request type, transport and outcome (ok or the error code)",
            ("type", "transport", "outcome"),
            registry=registry,
        )
        self.seconds = Histogram(
            "pi05_request_seconds",
            "From a request's receipt to its reply, by request type and transport",
            ("type", "transport"),
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )

    def observe(self, internal: bool, robot: str, type_: str, outcome: str, seconds: float) -> None:
        """A `transport.admission.Observer`."""
        kind = type_ if type_ in REPLY_TYPE else "unparsed" if not type_ else "other"
        transport = transport_of(internal, robot)
        self.requests.labels(kind, transport, outcome if outcome == "ok" or outcome in ERROR_CODES else "other").inc()
        self.seconds.labels(kind, transport).observe(seconds)
