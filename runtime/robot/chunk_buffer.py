"""The action-chunk buffer between the policy and a fixed-rate control loop.

Every action in the buffer is scheduled for an absolute control step. A chunk computed from the
observation of step s holds the actions for steps s, s+1, ...; when it arrives at step t, the
actions for steps s .. t-1 have already passed during inference and are dropped (latency
compensation), and the rest is merged with what is left of the current plan by the selected
policy: replace, a linear crossfade over k steps, a per-step weighted average (LeRobot's
0.3 old / 0.7 new), or real-time chunking.

When to ask for the next chunk is learnt from the delays measured in every mode: the delay d of a
chunk is the steps between its observation and its arrival; the estimate is a high percentile of
the recent ones (by default the largest of the last 20), the first chunk left out (it carries the
server's compilation and the connection set-up). The next chunk is asked for when d plus a margin
of actions are left, never later than `request_when_left` (a floor that also rules before anything
was measured). The learnt part never asks while a request is in flight: where d plus the margin
exceeds the H - d actions a chunk still holds when it lands, it asks as each chunk lands, the
earliest a server computing one request at a time can start the next; an earlier, overlapping
request would only queue behind the last one, be answered later than it, and raise the delay it
was asked for. A single slow reply raises the trigger until it leaves the window.

Real-time chunking (`rtc`; Black, Galliker & Levine 2025) moves the blending into the model: each
request carries the unexecuted leftover from its observation's step (`rtc_inputs`), the
inference delay d (steps the robot executes from the old chunk before the new one lands) and the
execution horizon s (steps executed from the new one before the next lands), and the server
samples a chunk whose first d steps continue the leftover. The buffer takes d from the same
estimate (at most H / 2), keeps s within d .. H - trigger (the leftover when asking is the
trigger above), asks for a chunk every s steps with one request in flight (the leftover must be
final when it is sent), and on arrival executes the new chunk from the step it arrives at,
unblended.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Literal

import numpy as np

from policy.request import SCHEDULES

Blend = Literal["replace", "crossfade", "average", "rtc"]
BLENDS: tuple[str, ...] = ("replace", "crossfade", "average", "rtc")


@dataclasses.dataclass(frozen=True)
class BufferSettings:
    # The floor of the request trigger: the next chunk is asked for when this many actions are left
    # at the latest (counting what the requests already in flight will cover), earlier when the
    # measured delays call for it. It alone rules until a delay was measured after the warm-up.
    request_when_left: int = 20
    # Steps asked for on top of the delay estimate: the jitter of the next delay.
    request_margin: int = 2
    # The delay estimate, shared by every mode: this percentile of the last `delay_window` measured
    # delays (steps), the first `warmup_chunks` left out.
    delay_percentile: float = 100.0
    delay_window: int = 20
    warmup_chunks: int = 1
    blend: Blend = "crossfade"
    crossfade_steps: int = 8
    average_old_weight: float = 0.3
    safe_action: tuple[float, ...] | None = None  # on underrun; None holds the last action
    # Real-time chunking (blend "rtc"): the wished execution horizon s (kept within d .. H - trigger)
    # and the guidance options sent along (the server's defaults when None).
    rtc_execute_horizon: int = 25
    rtc_schedule: str | None = None
    rtc_max_guidance_weight: float | None = None

    def __post_init__(self) -> None:
        if self.blend not in BLENDS:
            raise ValueError(f"blend must be one of {', '.join(BLENDS)}, got {self.blend!r}")
        if self.request_when_left < 0 or self.request_margin < 0 or self.crossfade_steps < 1:
            raise ValueError("request_when_left and request_margin must be >= 0, crossfade_steps >= 1")
        if not 0.0 <= self.average_old_weight <= 1.0:
            raise ValueError(f"average_old_weight must be in [0, 1], got {self.average_old_weight}")
        if self.delay_window < 1 or self.warmup_chunks < 0:
            raise ValueError("delay_window must be >= 1 and warmup_chunks >= 0")
        if not 0.0 <= self.delay_percentile <= 100.0:
            raise ValueError(f"delay_percentile must be in [0, 100], got {self.delay_percentile}")
        if self.rtc_execute_horizon < 1:
            raise ValueError(f"rtc_execute_horizon must be >= 1, got {self.rtc_execute_horizon}")
        if self.rtc_schedule is not None and self.rtc_schedule not in SCHEDULES:
            raise ValueError(f"rtc_schedule must be one of {', '.join(SCHEDULES)}, got {self.rtc_schedule!r}")
        if self.rtc_max_guidance_weight is not None and not self.rtc_max_guidance_weight >= 0.0:
            raise ValueError(f"rtc_max_guidance_weight must be >= 0, got {self.rtc_max_guidance_weight}")


@dataclasses.dataclass(frozen=True)
class Leftover:
    """The unexecuted rest of the plan from `start_step` on."""

    start_step: int
    actions: np.ndarray


@dataclasses.dataclass(frozen=True)
class RtcInputs:
    """What a request from the observation of `leftover.start_step` carries in `rtc` mode: the
    leftover (row 0 is that step's action), d and s."""

    leftover: Leftover
    inference_delay: int
    execute_horizon: int


HISTORY = 30_000  # samples kept per metric: 10 minutes at 50 Hz, so a robot can run for days


def append_bounded(values: list, value, limit: int = HISTORY) -> None:
    """Appends, keeping between `limit` and `2 * limit` of the newest values (amortized O(1))."""
    values.append(value)
    if len(values) > 2 * limit:
        del values[:-limit]


@dataclasses.dataclass
class BufferMetrics:
    """Counters over the whole run; the sample lists hold the newest `HISTORY` or so."""

    underruns: int = 0
    chunks_received: int = 0
    stale_chunks: int = 0
    delays_steps: list[int] = dataclasses.field(default_factory=list)
    delays_ms: list[float] = dataclasses.field(default_factory=list)
    depths: list[int] = dataclasses.field(default_factory=list)


class ActionChunkBuffer:
    """Chunks may be wider than the robot's `action_dim` (a model's robot dims beyond the ones this
    robot uses): the plan keeps every column, so a leftover sent back for real-time chunking is
    the server's own chunk, and `next_action` hands the robot its first `action_dim`."""

    def __init__(self, action_dim: int, settings: BufferSettings | None = None):
        self.settings = settings or BufferSettings()
        self.action_dim = action_dim
        self._plan = np.zeros((0, action_dim), np.float64)
        self._first_step = 0
        self._last_action: np.ndarray | None = None
        self._chunk_obs_step: int | None = None
        self._horizon = 0  # length of the chunks seen so far
        self._delays: collections.deque[int] = collections.deque(maxlen=self.settings.delay_window)
        self.metrics = BufferMetrics()

    def actions_left(self, step: int) -> int:
        """Actions planned for `step` and after."""
        return max(0, len(self._plan) - max(0, step - self._first_step))

    def needs_chunk(self, step: int, in_flight_obs_steps: tuple[int, ...] | list[int] = ()) -> bool:
        """Whether to request now: with `request_trigger()` actions left and no request in flight,
        or with `request_when_left` left counting what the requests in flight will cover (one from
        the observation of step s covers the steps up to s + horizon): only the floor pipelines. In
        `rtc` mode: every s steps after the current chunk's observation, never while a request is
        in flight."""
        if self.settings.blend == "rtc":
            if in_flight_obs_steps:
                return False
            return self._chunk_obs_step is None or step - self._chunk_obs_step >= self.execute_horizon()
        end = self._first_step + len(self._plan)
        if not in_flight_obs_steps:
            return end - step <= self.request_trigger()
        for obs_step in in_flight_obs_steps:
            end = max(end, obs_step + self._horizon)
        return end - step <= self.settings.request_when_left

    def chunk_age(self, step: int) -> int | None:
        """Steps since the observation the current plan was computed from."""
        return None if self._chunk_obs_step is None else step - self._chunk_obs_step

    def next_action(self, step: int) -> np.ndarray:
        """The action for control step `step`; never blocks. On underrun: the last or the safe action."""
        left = self.actions_left(step)
        append_bounded(self.metrics.depths, left)
        index = step - self._first_step
        if left > 0 and index >= 0:
            self._last_action = self._plan[index, : self.action_dim]
            return self._last_action.copy()
        self.metrics.underruns += 1
        if self.settings.safe_action is not None:
            return np.asarray(self.settings.safe_action, np.float64)
        if self._last_action is not None:
            return self._last_action.copy()
        return np.zeros(self.action_dim, np.float64)

    def add_chunk(
        self,
        actions: np.ndarray,
        obs_step: int,
        now_step: int,
        delay_ms: float | None = None,
    ) -> int:
        """Merges a chunk computed from the observation of `obs_step`, arriving before step `now_step`
        is executed. Returns the number of stale actions dropped (= now_step - obs_step, at most the
        chunk length)."""
        actions = np.asarray(actions, np.float64)
        if actions.ndim != 2 or actions.shape[1] < self.action_dim:
            raise ValueError(f"a chunk must be (horizon, at least {self.action_dim}), got {actions.shape}")
        if now_step < obs_step:
            raise ValueError(f"a chunk cannot arrive (step {now_step}) before its observation (step {obs_step})")
        delay = now_step - obs_step
        self._horizon = max(self._horizon, len(actions))
        self.metrics.chunks_received += 1
        append_bounded(self.metrics.delays_steps, delay)
        if self.metrics.chunks_received > self.settings.warmup_chunks:
            self._delays.append(delay)
        if delay_ms is not None:
            append_bounded(self.metrics.delays_ms, delay_ms)
        if delay >= len(actions) or (self._chunk_obs_step is not None and obs_step < self._chunk_obs_step):
            # All of it has passed, or a newer observation's chunk is already in the plan.
            self.metrics.stale_chunks += 1
            return len(actions)
        new = actions[delay:]
        old = self._plan[now_step - self._first_step :]  # steps only move forward: now_step >= _first_step
        if old.shape[1] != new.shape[1]:  # the server's width changed: nothing of the old plan blends in
            old = old[:0, :0]
        self._plan = self._merge(old, new)
        self._first_step = now_step
        self._chunk_obs_step = obs_step
        return delay

    def _merge(self, old: np.ndarray, new: np.ndarray) -> np.ndarray:
        s = self.settings
        n = min(len(old), len(new))
        if s.blend in ("replace", "rtc") or n == 0:  # rtc: the new chunk continues the old by itself
            return new.copy()
        merged = new.copy()
        if s.blend == "crossfade":
            w = np.minimum(1.0, np.arange(1, n + 1) / (s.crossfade_steps + 1))[:, None]
        else:
            w = np.full((n, 1), 1.0 - s.average_old_weight)
        merged[:n] = (1.0 - w) * old[:n] + w * new[:n]
        return merged

    def leftover(self, step: int) -> Leftover:
        index = max(0, step - self._first_step)
        return Leftover(step, self._plan[index:].copy())

    def delay_estimate(self) -> int | None:
        """The `delay_percentile` of the last `delay_window` measured delays (steps), rounded up;
        None before a chunk past the warm-up arrived."""
        if not self._delays:
            return None
        return math.ceil(np.percentile(np.fromiter(self._delays, float), self.settings.delay_percentile))

    def request_trigger(self) -> int:
        """Actions left at which the next chunk is asked for with no request in flight: d +
        `request_margin`, so a chunk as late as the estimate lands before the plan runs out, and
        never below `request_when_left`, which alone rules before any delay was measured. It is
        not capped, but it asks for no more than the chunk in hand can cover: `needs_chunk` holds
        it back while a request is in flight, so past H - d (what a chunk holds when it lands d
        late) it asks as each chunk lands; only the floor may ask earlier, overlapping requests
        (pipelining, for a latency that is not the server's computing, e.g. a long network path)."""
        d = self.delay_estimate()
        floor = self.settings.request_when_left
        return floor if d is None else max(floor, d + self.settings.request_margin)

    def inference_delay(self) -> int:
        """d as a guided request carries it: the delay estimate, at most half the horizon (the
        most it may carry); 0 before any was measured."""
        return min(self.delay_estimate() or 0, self._horizon // 2)

    def execute_horizon(self) -> int:
        """s: `rtc_execute_horizon` kept within max(d, 1) .. H - max(trigger, d) (H: the chunks'
        length), so the leftover when asking covers the delay and its margin, and holds the d
        steps the server continues; d wins where they cross (one request in flight: a request
        before the last one landed would carry a leftover not yet final)."""
        d = self.inference_delay()
        s = self.settings.rtc_execute_horizon
        if not self._horizon:
            return max(s, 1)
        return max(d, 1, min(s, self._horizon - max(self.request_trigger(), d)))

    def rtc_inputs(self, obs_step: int) -> RtcInputs | None:
        """What a request from the observation of `obs_step` sends in `rtc` mode; None in other
        modes or with nothing left to continue (the request then samples unguided)."""
        if self.settings.blend != "rtc":
            return None
        leftover = self.leftover(obs_step)
        if len(leftover.actions) == 0 or obs_step < self._first_step:
            return None
        return RtcInputs(leftover, self.inference_delay(), self.execute_horizon())
