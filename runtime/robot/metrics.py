"""A robot's control loop in Prometheus (`robots.run --metrics-port`): where a real-time failure
shows first (underruns, jitter, the inference delay against the chunk, outages).

`LoopMetrics` is an `on_tick` companion: it reads each tick's `LoopStatus` (the loop's own counters)
and moves its counters by what changed since the last tick, so the loop keeps no metrics code of
its own and a run without `--metrics-port` pays nothing. A new loop (the next episode) starts its
counters from zero; the exported counters keep growing across them.
"""

from __future__ import annotations

import dataclasses

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from runtime.metrics_http import LATENCY_BUCKETS_S
from runtime.robot.control_loop import LoopStatus

JITTER_BUCKETS_S = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
DELAY_BUCKETS_STEPS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50, 75, 100)

# LoopStatus counters -> (metric name, help); each moves by its increase per tick.
_COUNTERS = {
    "ticks": ("pi05_loop_ticks", "Control ticks run"),
    "underruns": ("pi05_loop_underruns", "Ticks with no planned action left (the safe action was held)"),
    "chunks_received": ("pi05_loop_chunks_received", "Action chunks merged into the buffer"),
    "outages": ("pi05_loop_outages", "Times the policy server stopped answering"),
    "outage_s": ("pi05_loop_outage_seconds", "Time without service"),
    "server_restarts": ("pi05_loop_server_restarts", "New server epochs seen after the first"),
    "request_errors": ("pi05_loop_request_errors", "Chunk requests answered with an error"),
}


class LoopMetrics:
    def __init__(self, registry: CollectorRegistry):
        self._counters = {field: Counter(name, text, registry=registry) for field, (name, text) in _COUNTERS.items()}
        self.jitter = Histogram(
            "pi05_loop_jitter_seconds", "How late each tick ran", buckets=JITTER_BUCKETS_S, registry=registry
        )
        self.delay = Histogram(
            "pi05_loop_inference_delay_seconds",
            "From a chunk's observation to its arrival",
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.delay_steps = Histogram(
            "pi05_loop_inference_delay_steps",
            "Ticks executed from the old chunk before a new one landed",
            buckets=DELAY_BUCKETS_STEPS,
            registry=registry,
        )
        self.depth = Gauge("pi05_loop_buffer_depth", "Planned actions left in the buffer", registry=registry)
        self.hz = Gauge("pi05_loop_achieved_hz", "Ticks per second achieved", registry=registry)
        self._last = LoopStatus()

    def __call__(self, status: LoopStatus) -> None:
        last = self._last if status.ticks >= self._last.ticks else LoopStatus()  # a new loop starts at zero
        for field, counter in self._counters.items():
            grown = getattr(status, field) - getattr(last, field)
            if grown > 0:
                counter.inc(grown)
        if status.jitter_ms is not None:
            self.jitter.observe(status.jitter_ms / 1e3)
        if status.chunks_received > last.chunks_received and status.last_delay_ms is not None:
            self.delay.observe(status.last_delay_ms / 1e3)
            if status.last_delay_steps is not None:
                self.delay_steps.observe(status.last_delay_steps)
        self.depth.set(status.depth)
        self.hz.set(status.achieved_hz)
        self._last = dataclasses.replace(status)
