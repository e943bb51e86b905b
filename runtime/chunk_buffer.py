"""The action-chunk buffer between the policy and a fixed-rate control loop.

Every action in the buffer is scheduled for an absolute control step. A chunk computed from the
observation of step s holds the actions for steps s, s+1, ...; when it arrives at step t, the
actions for steps s .. t-1 have already passed during inference and are dropped (latency
compensation), and the rest is merged with what is left of the current plan by the selected
policy: replace, a linear crossfade over k steps, or a per-step weighted average (LeRobot's
0.3 old / 0.7 new). The unexecuted leftover stays available, in model space when the server sent
it, for real-time chunking (guided inpainting toward the leftover) to plug in.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

Blend = Literal["replace", "crossfade", "average"]


@dataclasses.dataclass(frozen=True)
class BufferSettings:
    # Ask for the next chunk when this many actions are left, counting what the requests already in
    # flight will cover. No underrun as long as a chunk's latency stays below this many steps
    # (a chunk's duration minus the steps executed before asking).
    request_when_left: int = 20
    blend: Blend = "crossfade"
    crossfade_steps: int = 8
    average_old_weight: float = 0.3
    safe_action: tuple[float, ...] | None = None  # on underrun; None holds the last action

    def __post_init__(self) -> None:
        if self.blend not in ("replace", "crossfade", "average"):
            raise ValueError(f"blend must be replace, crossfade or average, got {self.blend!r}")
        if self.request_when_left < 0 or self.crossfade_steps < 1:
            raise ValueError("request_when_left must be >= 0 and crossfade_steps >= 1")
        if not 0.0 <= self.average_old_weight <= 1.0:
            raise ValueError(f"average_old_weight must be in [0, 1], got {self.average_old_weight}")


@dataclasses.dataclass(frozen=True)
class Leftover:
    """The unexecuted rest of the plan from `start_step` on."""

    start_step: int
    actions: np.ndarray
    model_actions: np.ndarray | None


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
    def __init__(self, action_dim: int, settings: BufferSettings | None = None):
        self.settings = settings or BufferSettings()
        self.action_dim = action_dim
        self._plan = np.zeros((0, action_dim), np.float64)
        self._model_plan: np.ndarray | None = None
        self._first_step = 0
        self._last_action: np.ndarray | None = None
        self._chunk_obs_step: int | None = None
        self._horizon = 0  # length of the chunks seen so far
        self.metrics = BufferMetrics()

    def actions_left(self, step: int) -> int:
        """Actions planned for `step` and after."""
        return max(0, len(self._plan) - max(0, step - self._first_step))

    def needs_chunk(self, step: int, in_flight_obs_steps: tuple[int, ...] | list[int] = ()) -> bool:
        """Whether to request now; a request in flight from the observation of step s will cover
        the steps up to s + horizon."""
        end = self._first_step + len(self._plan)
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
            self._last_action = self._plan[index]
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
        model_actions: np.ndarray | None = None,
    ) -> int:
        """Merges a chunk computed from the observation of `obs_step`, arriving before step `now_step`
        is executed. Returns the number of stale actions dropped (= now_step - obs_step, at most the
        chunk length)."""
        actions = np.asarray(actions, np.float64)
        if actions.ndim != 2 or actions.shape[1] != self.action_dim:
            raise ValueError(f"a chunk must be (horizon, {self.action_dim}), got {actions.shape}")
        if now_step < obs_step:
            raise ValueError(f"a chunk cannot arrive (step {now_step}) before its observation (step {obs_step})")
        delay = now_step - obs_step
        self._horizon = max(self._horizon, len(actions))
        self.metrics.chunks_received += 1
        append_bounded(self.metrics.delays_steps, delay)
        if delay_ms is not None:
            append_bounded(self.metrics.delays_ms, delay_ms)
        if delay >= len(actions) or (self._chunk_obs_step is not None and obs_step < self._chunk_obs_step):
            # All of it has passed, or a newer observation's chunk is already in the plan.
            self.metrics.stale_chunks += 1
            return len(actions)
        new = actions[delay:]
        old = self._plan[now_step - self._first_step :]  # steps only move forward: now_step >= _first_step
        self._plan = self._merge(old, new)
        self._model_plan = None if model_actions is None else np.asarray(model_actions)[delay:]
        self._first_step = now_step
        self._chunk_obs_step = obs_step
        return delay

    def _merge(self, old: np.ndarray, new: np.ndarray) -> np.ndarray:
        s = self.settings
        n = min(len(old), len(new))
        if s.blend == "replace" or n == 0:
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
        model = None if self._model_plan is None else self._model_plan[index:]
        return Leftover(step, self._plan[index:].copy(), model)
