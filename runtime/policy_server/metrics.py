"""The policy server's Prometheus metrics (`--metrics-port`): what its engine did with each request,
and what the server holds at the moment of a scrape.

Events (a request's queue wait and phases) are observed as they happen, from the engine's own timing
of each result; everything else (sessions, queue depth, batches, compiles, health)
is read off counters the server keeps anyway, only when Prometheus scrapes: serving pays
nothing for it. The engine's batch sizes are bounded by `--max-batch`, so `batch` is a bounded label.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from policy.request import InferenceRequest, InferenceResult
from runtime.metrics_http import LATENCY_BUCKETS_S
from runtime.policy_server.service import PolicyService


def result_kind(request: InferenceRequest) -> str:
    """infer, subtask (asked by a robot) or refresh (the server's own, on a robot's interval)."""
    return "refresh" if request.priority == "refresh" else request.kind


class EngineMetrics:
    """Each result's stages, in seconds, by kind and by the size of the batch that answered it."""

    def __init__(self, registry: CollectorRegistry):
        def stage(name: str, what: str) -> Histogram:
            return Histogram(
                f"pi05_engine_{name}_seconds", what, ("kind", "batch"), buckets=LATENCY_BUCKETS_S, registry=registry
            )

        self.total = stage("total", "From submission to the engine to its result")
        self.queue = stage("queue", "Waiting in the engine's queue before a batch took it")
        self.subtask = stage("subtask", "Decoding the subtask (requests that generated one)")
        self.action = stage("action", "Sampling the action chunk (flow matching)")

    def observe(self, session: str, request: InferenceRequest, result: InferenceResult) -> None:
        """A `PolicyService` `on_result`: the session is not a label (robot ids are unbounded)."""
        labels = (result_kind(request), str(result.batch))
        timing = result.timing
        self.total.labels(*labels).observe(timing["total_ms"] / 1e3)
        self.queue.labels(*labels).observe(timing["queue_ms"] / 1e3)
        if result.subtask is not None:
            self.subtask.labels(*labels).observe(timing["subtask_ms"] / 1e3)
        if result.actions is not None:
            self.action.labels(*labels).observe(timing["action_ms"] / 1e3)


class ServerCollector(Collector):
    """Sessions, refreshes and the engine's counters, read at scrape time."""

    def __init__(self, service: PolicyService):
        self._service = service

    def describe(self) -> list:
        return []  # read at scrape time only (registering must not call into the server)

    def collect(self) -> Iterator:
        service = self._service
        yield GaugeMetricFamily("pi05_sessions", "Robot sessions held", value=len(service.sessions))
        yield GaugeMetricFamily(
            "pi05_refreshing_sessions", "Sessions with a subtask refresh interval", value=service.scheduler.active()
        )
        yield CounterMetricFamily("pi05_sessions_expired", "Sessions ended by silence", value=service.expired)
        yield CounterMetricFamily("pi05_sessions_evicted", "Sessions ended to make room", value=service.evicted)
        yield CounterMetricFamily(
            "pi05_refreshes_published", "Subtask refreshes published", value=service.scheduler.published
        )
        yield CounterMetricFamily(
            "pi05_refreshes_failed", "Subtask refreshes whose generation failed", value=service.scheduler.failed
        )
        yield from _engine(service)


def _engine(service: PolicyService) -> Iterator:
    stats = service.backend.stats()
    yield GaugeMetricFamily("pi05_engine_healthy", "1 while the engine serves", value=int(stats.healthy))
    yield GaugeMetricFamily("pi05_engine_queue_depth", "Requests queued for the model", value=stats.queued)
    yield GaugeMetricFamily("pi05_engine_in_flight", "Requests submitted and not yet answered", value=stats.in_flight)
    batches = CounterMetricFamily(
        "pi05_engine_batches", "Batches run, by phase and real rows (the batch size)", labels=("phase", "rows")
    )
    for (phase, rows), n in sorted(stats.batches.items()):
        batches.add_metric((phase, str(rows)), n)
    yield batches
    compiles = CounterMetricFamily("pi05_engine_compiles", "Executables compiled, by phase", labels=("phase",))
    seconds = CounterMetricFamily("pi05_engine_compile_seconds", "Seconds spent compiling, by phase", labels=("phase",))
    for phase, (n, s) in sorted(stats.compiles.items()):
        compiles.add_metric((phase,), n)
        seconds.add_metric((phase,), s)
    yield compiles
    yield seconds
    yield CounterMetricFamily("pi05_engine_failed_batches", "Batches that raised", value=stats.failed_batches)
    yield CounterMetricFamily(
        "pi05_engine_nonfinite_rows", "Results refused for NaN or infinite actions", value=stats.nonfinite_rows
    )
