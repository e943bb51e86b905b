"""The broker's Prometheus figures (a front host's or `runtime.broker`'s `--metrics-port`): the
workers alive, each one's requests and robots, workers lost and robots moved, read off the broker's
own counters when Prometheus scrapes (the broker's thread pays nothing for it). A worker's name is
a label, bounded by the worker table; a worker that leaves takes its series with it."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from runtime.fleet.broker import Broker


class BrokerCollector(Collector):
    def __init__(self, broker: Broker):
        self._broker = broker

    def describe(self) -> list:
        return []  # read at scrape time only

    def collect(self) -> Iterator:
        broker = self._broker
        workers = list(broker.table.workers.values())  # one atomic copy: the broker's thread changes it
        yield GaugeMetricFamily("pi05_fleet_workers", "Policy workers joined and alive", value=len(workers))
        routed = CounterMetricFamily("pi05_fleet_routed", "Requests sent to each worker", labels=("worker",))
        served = CounterMetricFamily("pi05_fleet_served", "Replies from each worker", labels=("worker",))
        robots = GaugeMetricFamily("pi05_fleet_worker_robots", "Robots placed on each worker", labels=("worker",))
        in_flight = GaugeMetricFamily(
            "pi05_fleet_worker_in_flight", "Requests each worker holds now", labels=("worker",)
        )
        for w in workers:
            routed.add_metric((w.name,), w.routed)
            served.add_metric((w.name,), w.served)
            robots.add_metric((w.name,), len(w.robots))
            in_flight.add_metric((w.name,), len(w.in_flight))
        yield from (routed, served, robots, in_flight)
        yield CounterMetricFamily("pi05_fleet_workers_lost", "Workers presumed dead", value=broker.table.lost)
        yield CounterMetricFamily(
            "pi05_fleet_robots_moved", "Robots whose worker left the table", value=broker.table.moved
        )
        yield CounterMetricFamily(
            "pi05_fleet_refreshes_forwarded", "Refresh messages forwarded from workers", value=broker.published
        )
