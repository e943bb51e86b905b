"""A drift-free fixed-rate control loop that executes action chunks from the policy server.

Tick k is scheduled at `start + k / hz` on the loop's clock (never `sleep(period)`, which drifts).
Each tick takes the action for step k from the chunk buffer and hands it to the robot; when the
buffer runs low (counting what requests in flight will cover) it observes and sends a request
without waiting, up to `max_in_flight` at once; a finished request is merged at the start of the
next tick, so the buffer knows exactly how many steps passed while the model ran, and from those
delays when to ask next (`ActionChunkBuffer.request_trigger`: the recent delays plus a margin,
`request_when_left` as the floor), so the loop keeps up with a slower server by itself. The client is
polled once per tick, on the loop's thread: no other thread touches the loop's state.

In `refresh` mode action requests are conditioned on the current subtask, which the server
regenerates every few seconds and publishes; every request carries the refresh interval (the server
treats it idempotently), so after a server restart the first request answered registers it again.

With the buffer in `rtc` mode (real-time chunking) each request also carries the buffer's
leftover from the request's observation step with its d and s, requests go every s steps, one at
a time, and a chunk arriving replaces the plan from its arrival step on.

When the server does not answer, a chunk request is abandoned after `request_timeout_s` and asked
again with a fresh observation; the buffer plays out what it has and then holds the safe action.
That is an outage: counted, timed from the unanswered request to the next reply, and shown in the
status and the summary. A new server `epoch` (in replies and refreshes) counts as a restart. When
the loop stops it clears its refresh and says `bye`, so the server stops working for it.

With `--rerun` the loop holds a `RobotLog` and hands it each observation (the images and state it
sends), each chunk as planned with its latency, each action it executes and each subtask it hears;
those calls only enqueue. Without it the loop holds None: no copy, no thread, no `rerun` import.

The clock and sleep are injectable: tests run the loop on a simulated clock, step by step.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal, Protocol

import numpy as np

from robots.base import Robot
from runtime.robot.chunk_buffer import ActionChunkBuffer, BufferSettings, append_bounded
from runtime.robot.rerun_log import RobotLog
from transport.errors import RemoteError, RequestTimeout, TransportError

log = logging.getLogger(__name__)

SubtaskMode = Literal["off", "per_chunk", "refresh"]

# Sleep until this close to a tick, then yield until it: sleep() overshoots by 0.1 ms and more.
_SPIN_S = 0.0005
# How long a stopping loop waits for each goodbye message: it must not hang on a dead server.
_LEAVE_TIMEOUT_S = 1.0
# A first chunk answered `unavailable` (a fleet between workers) is asked again this often, this long.
FIRST_CHUNK_RETRY_GAP_S = 0.5
FIRST_CHUNK_RETRY_S = 60.0


class LoopClient(Protocol):
    """What the loop needs of its client: `transport.zmq_client.PolicyClient` (tests simulate one)."""

    def start_infer(
        self,
        images: Mapping[str, np.ndarray],
        high_level_prompt: str,
        state: np.ndarray | None = None,
        timestamp: float | None = None,
        *,
        timeout_s: float | None = None,
        retries: int | None = None,
        **options: Any,
    ) -> concurrent.futures.Future: ...

    def wait(self, future: concurrent.futures.Future) -> dict[str, Any]: ...

    def poll(self, timeout_s: float = 0.0) -> None: ...

    def set_refresh(
        self, interval_s: float | None, *, timeout_s: float | None = None, retries: int | None = None
    ) -> dict[str, Any]: ...

    def bye(self, *, timeout_s: float | None = None, retries: int | None = None) -> dict[str, Any]: ...

    def listen_refreshes(self, pub_endpoint: str, callback: Callable[[dict[str, Any]], None]) -> Any: ...


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    prompt: str = "pick up the block"
    hz: float = 50.0
    buffer: BufferSettings = dataclasses.field(default_factory=BufferSettings)
    # Requests pipelined: a `request_when_left` above H - delay asks again before the last one is
    # answered, which lets a latency past half a chunk be covered by a server that batches them.
    max_in_flight: int = 2
    subtask_mode: SubtaskMode = "off"
    refresh_interval_s: float = 2.0
    max_decoding_steps: int = 25
    temperature: float = 0.0
    # A chunk request unanswered this long is abandoned (the server counts as unreachable) and
    # asked again with a fresh observation. The first chunk waits with the client's own timeouts.
    request_timeout_s: float = 5.0


@dataclasses.dataclass
class _InFlight:
    future: concurrent.futures.Future
    obs_step: int
    obs_time: float
    generates_subtask: bool


@dataclasses.dataclass
class LoopStatus:
    """What the live status line and the metrics (`runtime.robot.metrics`) read each tick."""

    step: int = 0
    ticks: int = 0
    jitter_ms: float | None = None  # how late this tick ran
    chunks_received: int = 0
    last_delay_steps: int | None = None
    subtask: str | None = None
    refresh_count: int = 0
    last_delay_ms: float | None = None
    depth: int = 0
    achieved_hz: float = 0.0
    underruns: int = 0
    outages: int = 0
    outage_s: float = 0.0  # time without service so far, the current outage included
    in_outage: bool = False
    server_restarts: int = 0
    request_errors: int = 0


class ControlLoop:
    def __init__(
        self,
        robot: Robot,
        client: LoopClient,
        settings: LoopSettings | None = None,
        pub_endpoint: str | None = None,
        on_tick: Callable[[LoopStatus], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        rerun: RobotLog | None = None,
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
        self._clock = clock
        self._sleep = sleep
        self._rerun = rerun
        self._stop = threading.Event()
        self._in_flight: list[_InFlight] = []
        self._elapsed_s = 0.0  # from the first tick to the latest one
        self._served = False  # a reply came: the server holds a session to end
        self._outage_since: float | None = None  # when the first unanswered request of an outage was sent
        self._outage_total_s = 0.0
        self._epochs: set[Any] = set()

    def stop(self) -> None:
        """Ends `run` after the current tick (from any thread)."""
        self._stop.set()

    # ------------------------------------------------------------------ server messages

    def _on_refresh(self, message: dict[str, Any]) -> None:
        self._see_epoch(message.get("epoch"))
        self.status.subtask = message.get("subtask")
        self.status.refresh_count = message.get("refresh_count", 0)
        self.subtasks_seen += 1
        if self._rerun is not None and self.status.subtask is not None:
            self._rerun.subtask(self.status.step, self.status.subtask, self.status.refresh_count)

    def _see_epoch(self, epoch: Any) -> None:
        """A server epoch not seen before, after another one, is a restarted server."""
        if epoch is None or epoch in self._epochs:
            return
        if self._epochs:
            self.status.server_restarts += 1
            log.warning("the policy server restarted (new epoch %s)", epoch)
        self._epochs.add(epoch)

    def _request(self, step: int, timeout_s: float | None, retries: int | None) -> _InFlight:
        obs = self.robot.observe()
        obs_time = self._clock()
        if self._rerun is not None:
            self._rerun.observation(step, obs.images, obs.state)
        s = self.settings
        options: dict[str, Any] = {"max_decoding_steps": s.max_decoding_steps, "temperature": s.temperature}
        generate = s.subtask_mode == "per_chunk" or (s.subtask_mode == "refresh" and self.status.subtask is None)
        options["generate_subtask"] = generate
        if s.subtask_mode == "refresh":
            options["subtask_refresh_interval"] = s.refresh_interval_s
            if not generate:
                options["low_level_prompt"] = self.status.subtask
        options.update(self._guidance(step))
        future = self.client.start_infer(
            obs.images, s.prompt, obs.state, obs_time, timeout_s=timeout_s, retries=retries, **options
        )
        return _InFlight(future, step, obs_time, generate)

    def _guidance(self, obs_step: int) -> dict[str, Any]:
        """Real-time chunking's request options for an observation of `obs_step` (none outside
        `rtc` mode or with no plan left to continue)."""
        rtc = self.buffer.rtc_inputs(obs_step)
        if rtc is None:
            return {}
        b = self.settings.buffer
        options: dict[str, Any] = {
            "prev_actions": rtc.leftover.actions,
            "inference_delay": rtc.inference_delay,
            "execute_horizon": rtc.execute_horizon,
        }
        if b.rtc_schedule is not None:
            options["rtc_schedule"] = b.rtc_schedule
        if b.rtc_max_guidance_weight is not None:
            options["max_guidance_weight"] = b.rtc_max_guidance_weight
        return options

    def _integrate(self, step: int, now: float) -> None:
        for flight in [f for f in self._in_flight if f.future.done()]:  # oldest observation first
            self._in_flight.remove(flight)
            self._merge(flight, step, now)

    def _merge(self, flight: _InFlight, step: int, now: float) -> None:
        try:
            reply = flight.future.result()
        except RequestTimeout as e:
            self._server_lost(flight, e)
            return
        except RemoteError as e:
            if e.code == "unavailable":  # a fleet's worker died under the request: the service is out
                self._server_lost(flight, e)
            else:
                self.status.request_errors += 1
                log.warning("chunk request failed: %s", e)
            return
        except TransportError as e:
            self.status.request_errors += 1
            log.warning("chunk request failed: %s", e)
            return
        self._served = True
        if self._outage_since is not None:
            lasted = now - self._outage_since
            self._outage_total_s += lasted
            self._outage_since = None
            self.status.in_outage = False
            log.warning("the policy server answers again, after %.1f s without service", lasted)
        self._see_epoch(reply.get("epoch"))
        actions = reply.get("actions")
        if actions is None or np.ndim(actions) != 2 or np.shape(actions)[1] < self.robot.action_dim:
            self.status.request_errors += 1
            log.warning("a reply without a usable action chunk (shape %s) was dropped", np.shape(actions))
            return
        delay_ms = (now - flight.obs_time) * 1e3
        actions = np.asarray(actions)
        self.buffer.add_chunk(actions, flight.obs_step, step, delay_ms)
        self.status.last_delay_ms = delay_ms
        if self._rerun is not None:  # the robot's dimensions of the plan (a view)
            planned = actions[:, : self.robot.action_dim]
            self._rerun.chunk(step, flight.obs_step, planned, 1.0 / self.settings.hz, delay_ms)
        if flight.generates_subtask and reply.get("subtask") is not None:
            self.status.subtask = reply["subtask"]
            self.subtasks_seen += 1
            if self._rerun is not None:
                self._rerun.subtask(step, self.status.subtask)

    def _server_lost(self, flight: _InFlight, error: TransportError) -> None:
        if self._outage_since is None:
            self._outage_since = flight.obs_time
            self.status.outages += 1
            self.status.in_outage = True
            log.warning("%s; holding the safe action until the server answers", error)
        else:
            log.debug("still no service: %s", error)

    def _outage_s(self, now: float) -> float:
        running = 0.0 if self._outage_since is None else now - self._outage_since
        return self._outage_total_s + running

    # ------------------------------------------------------------------ the loop

    def run(self, duration_s: float | None = None) -> dict[str, Any]:
        """Runs until `duration_s` passes or `stop()` is called; returns the summary.

        Raises the client's error (e.g. `ServerUnreachable`) when the first chunk cannot be had.
        """
        s = self.settings
        period = 1.0 / s.hz
        if s.subtask_mode == "refresh" and self._pub:
            self.client.listen_refreshes(self._pub, self._on_refresh)
        if self._rerun is not None:
            self._rerun.start_run()
        try:
            # The first chunk is waited for before the clock starts: underruns count only real ones.
            self._in_flight = [self._first_chunk()]
            start = self._clock()
            step = 0
            while not self._stop.is_set() and (duration_s is None or step * period < duration_s):
                scheduled = start + step * period
                self._wait_until(scheduled)
                now = self._clock()
                append_bounded(self.jitter_ms, (now - scheduled) * 1e3)
                self.client.poll(0.0)
                self._integrate(step, now)
                action = self.buffer.next_action(step)
                self.robot.act(action)
                append_bounded(self.executed, action)
                if self._rerun is not None:
                    self._rerun.executed(step, action)
                self.ticks += 1
                pending = [f.obs_step for f in self._in_flight]
                if len(pending) < s.max_in_flight and self.buffer.needs_chunk(step + 1, pending):
                    self._in_flight.append(self._request(step + 1, s.request_timeout_s, retries=0))
                self._elapsed_s = now - start
                step += 1
                self._update_status(step)
        finally:
            for flight in self._in_flight:
                flight.future.cancel()
            self._in_flight = []
            if self._outage_since is not None:  # the summary counts the outage up to the end
                self._outage_total_s += self._clock() - self._outage_since
                self._outage_since = None
            if self._served:
                self._leave()
        return self.summary()

    def _first_chunk(self) -> _InFlight:
        """The first chunk's request, answered. A fleet answers `unavailable` when the worker holding it
        died, or none is joined yet: asked again, as a later chunk would be, for `FIRST_CHUNK_RETRY_S`."""
        deadline = self._clock() + FIRST_CHUNK_RETRY_S
        while True:
            first = self._request(0, timeout_s=None, retries=None)
            try:
                self.client.wait(first.future)
                return first
            except RemoteError as e:
                if e.code != "unavailable" or self._stop.is_set() or self._clock() > deadline:
                    raise
                log.warning("%s; asking for the first chunk again", e)
                self._sleep(FIRST_CHUNK_RETRY_GAP_S)

    def _wait_until(self, deadline: float) -> None:
        while (remaining := deadline - self._clock()) > 0:
            self._sleep(remaining - _SPIN_S if remaining > 2 * _SPIN_S else 0.0)

    def _leave(self) -> None:
        """Tells the server this robot is done: its refresh cleared, then its session ended."""
        try:
            if self.settings.subtask_mode == "refresh":
                self.client.set_refresh(None, timeout_s=_LEAVE_TIMEOUT_S, retries=0)
            self.client.bye(timeout_s=_LEAVE_TIMEOUT_S, retries=0)
        except TransportError as e:
            log.warning("could not sign off from the policy server: %s", e)

    def _update_status(self, step: int) -> None:
        st = self.status
        st.step = step
        st.ticks = self.ticks
        st.jitter_ms = self.jitter_ms[-1] if self.jitter_ms else None
        metrics = self.buffer.metrics
        st.chunks_received = metrics.chunks_received
        st.last_delay_steps = metrics.delays_steps[-1] if metrics.delays_steps else None
        st.depth = self.buffer.actions_left(step)
        st.underruns = metrics.underruns
        st.achieved_hz = self._rate()
        st.outage_s = self._outage_s(self._clock())
        if self._on_tick is not None:
            self._on_tick(st)

    def _rate(self) -> float:
        """Ticks per second: the intervals between the ticks run over the time they took."""
        return (self.ticks - 1) / self._elapsed_s if self._elapsed_s > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        m = self.buffer.metrics
        ticks = self.ticks

        def pct(values: list[float], q: float) -> float | None:
            return float(np.percentile(values, q)) if values else None

        return {
            "ticks": ticks,
            "achieved_hz": self._rate(),
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
            "outages": self.status.outages,
            "outage_s": self._outage_s(self._clock()),
            "server_restarts": self.status.server_restarts,
            "request_errors": self.status.request_errors,
        }
