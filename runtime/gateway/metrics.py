"""The gateways' figure for the metrics of the process that runs them (a server or a front host):
their open WebSocket connections, as each gateway process last reported them on its stdout."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from runtime.gateway.supervisor import GatewayProcess


class GatewayCollector(Collector):
    def __init__(self, gateways: Sequence[GatewayProcess]):
        self._gateways = gateways

    def describe(self) -> list:
        return []  # read at scrape time only

    def collect(self) -> Iterator[GaugeMetricFamily]:
        connections = GaugeMetricFamily(
            "pi05_gateway_connections", "Open WebSocket connections, by gateway", labels=("gateway",)
        )
        for gateway in self._gateways:
            connections.add_metric((gateway.name,), gateway.connections)
        yield connections
