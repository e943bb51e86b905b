"""A drift-free fixed-rate control loop that executes action chunks from the policy server.

Tick k is scheduled at `start + k / hz` on the monotonic clock (never `sleep(period)`, which
drifts). Each tick takes the action for step k from the chunk buffer and hands it to the robot;
when the buffer runs low (counting what requests in flight will cover) it observes and sends a
request in the background over the DEALER client, up to `max_in_flight` at once; a finished request
is merged at the start of the next tick, so the buffer knows exactly how many steps passed while
the model ran. A SUB listener keeps the current subtask; in `refresh`
mode action requests are conditioned on it, so the subtask is regenerated every few seconds while
chunks flow at their own rate.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

import numpy as np

from robots.base import Robot
from runtime.chunk_buffer import ActionChunkBuffer, BufferSettings, append_bounded
from transport.zmq_client import PolicyClient

log = logging.getLogger(__name__)

SubtaskMode = Literal["off", "per_chunk", "refresh"]


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    prompt: str = "pick up the block"
    hz: float = 50.0
    buffer: BufferSettings = dataclasses.field(default_factory=BufferSettings)
    max_in_flight: int = 2  # requests pipelined, so latency may exceed half a chunk
    subtask_mode: SubtaskMode = "off"
    refresh_interval_s: float = 2.0
    max_decoding_steps: int = 25
    temperature: float = 0.0


@dataclasses.dataclass
class _InFlight:
    future: concurrent.futures.Future
    obs_step: int
    obs_time: float


@dataclasses.dataclass
class LoopStatus:
    """What the live status line shows."""

    step: int = 0
    subtask: str | None = None
    refresh_count: int = 0
    last_delay_ms: float | None = None
    depth: int = 0
    achieved_hz: float = 0.0
    underruns: int = 0


class ControlLoop:
    def __init__(
        self,
        robot: Robot,
        client: PolicyClient,
        settings: LoopSettings | None = None,
        pub_endpoint: str | None = None,
        on_tick: Callable[[LoopStatus], None] | None = None,
    ):
        self.robot = robot
        self.client = client
        self.settings = settings or LoopSettings()
        self.buffer = ActionChunkBuffer(robot.action_dim, self.settings.buffer)
        self.status = LoopStatus()
        # The newest actions handed to the robot and tick delays (bounded: see `append_bounded`).
        self.executed: list[np.ndarray] = []
        self.jitter_ms: list[float] = []
        self.ticks = 0
        self.subtasks_seen = 0
        self._on_tick = on_tick
        self._pub = pub_endpoint
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._in_flight: list[_InFlight] = []
        self._elapsed_s = 0.0

    def stop(self) -> None:
        self._stop.set()

    def _on_refresh(self, message: dict[str, Any]) -> None:
        with self._lock:
            self.status.subtask = message.get("subtask")
            self.status.refresh_count = message.get("refresh_count", 0)
            self.subtasks_seen += 1

    def _request(self, step: int) -> _InFlight:
        obs = self.robot.observe()
        obs_time = time.monotonic()
        s = self.settings
        options: dict[str, Any] = {"max_decoding_steps": s.max_decoding_steps, "temperature": s.temperature}
        with self._lock:
            subtask = self.status.subtask
        if s.subtask_mode == "per_chunk":
            options["generate_subtask"] = True
        elif s.subtask_mode == "refresh" and subtask:
            options.update(generate_subtask=False, low_level_prompt=subtask)
        else:
            options["generate_subtask"] = False
        future = self.client.submit(lambda c: c.infer(obs.images, s.prompt, obs.state, obs_time, **options))
        return _InFlight(future, step, obs_time)

    def _integrate(self, step: int) -> None:
        for flight in [f for f in self._in_flight if f.future.done()]:  # oldest observation first
            self._in_flight.remove(flight)
            self._merge(flight, step)

    def _merge(self, flight: _InFlight, step: int) -> None:
        try:
            reply = flight.future.result()
        except Exception as e:
            log.warning("chunk request failed: %s", e)
            return
        delay_ms = (time.monotonic() - flight.obs_time) * 1e3
        actions = np.asarray(reply["actions"])[:, : self.robot.action_dim]
        self.buffer.add_chunk(actions, flight.obs_step, step, delay_ms)
        self.status.last_delay_ms = delay_ms
        if self.settings.subtask_mode == "per_chunk" and reply.get("subtask") is not None:
            with self._lock:
                self.status.subtask = reply["subtask"]
                self.subtasks_seen += 1

    def _start_refresh(self) -> None:
        s = self.settings
        if s.subtask_mode != "refresh":
            return
        if self._pub:
            self.client.listen_refreshes(self._pub, self._on_refresh)
            time.sleep(0.1)  # let the subscription reach the server before the first refresh
        obs = self.robot.observe()
        ack = self.client.set_refresh(
            s.refresh_interval_s, obs.images, s.prompt, obs.state,
            max_decoding_steps=s.max_decoding_steps, temperature=s.temperature,
        )  # fmt: skip
        if ack.get("last"):
            self._on_refresh(ack["last"])

    def run(self, duration_s: float | None = None) -> dict[str, Any]:
        """Runs until `duration_s` passes or `stop()` is called; returns the summary."""
        s = self.settings
        period = 1.0 / s.hz
        self._start_refresh()
        # The first chunk is waited for before the clock starts: underruns count only real ones.
        first = self._request(0)
        first.future.result()
        self._in_flight = [first]
        start = time.monotonic()
        step = 0
        try:
            while not self._stop.is_set() and (duration_s is None or step * period < duration_s):
                scheduled = start + step * period
                _sleep_until(scheduled)
                now = time.monotonic()
                append_bounded(self.jitter_ms, (now - scheduled) * 1e3)
                self._integrate(step)
                action = self.buffer.next_action(step)
                self.robot.act(action)
                append_bounded(self.executed, action)
                self.ticks += 1
                pending = [f.obs_step for f in self._in_flight]
                if len(pending) < s.max_in_flight and self.buffer.needs_chunk(step + 1, pending):
                    self._in_flight.append(self._request(step + 1))
                step += 1
                self._elapsed_s = time.monotonic() - start
                self._update_status(step)
        finally:
            for flight in self._in_flight:
                flight.future.cancel()
        return self.summary()

    def _update_status(self, step: int) -> None:
        st = self.status
        st.step = step
        st.depth = self.buffer.actions_left(step)
        st.underruns = self.buffer.metrics.underruns
        st.achieved_hz = step / self._elapsed_s if self._elapsed_s > 0 else 0.0
        if self._on_tick is not None:
            self._on_tick(st)

    def summary(self) -> dict[str, Any]:
        m = self.buffer.metrics
        ticks = self.ticks

        def pct(values: list[float], q: float) -> float | None:
            return float(np.percentile(values, q)) if values else None

        return {
            "ticks": ticks,
            "achieved_hz": ticks / self._elapsed_s if self._elapsed_s > 0 else 0.0,
            "jitter_ms_p50": pct(self.jitter_ms, 50),
            "jitter_ms_p99": pct(self.jitter_ms, 99),
            "underruns": m.underruns,
            "chunks_received": m.chunks_received,
            "stale_chunks": m.stale_chunks,
            "inference_delay_ms_p50": pct(m.delays_ms, 50),
            "inference_delay_ms_p99": pct(m.delays_ms, 99),
            "inference_delay_steps_p50": pct(m.delays_steps, 50),
            "inference_delay_steps_max": max(m.delays_steps) if m.delays_steps else None,
            "buffer_depth_min": min(m.depths) if m.depths else None,
            "subtasks_seen": self.subtasks_seen,
            "refresh_count": self.status.refresh_count,
        }


def _sleep_until(deadline: float) -> None:
    """Sleeps most of the way, then spins the last half millisecond: sleep() overshoots by ~0.1 ms+."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        time.sleep(remaining - 0.0005 if remaining > 0.001 else 0)
