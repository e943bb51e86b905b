"""The simulated arm's task, episode after episode: `--demo` and `python -m robots.run --robot sim`.

Each episode draws a new scene (`SimArm.reset`), asks with its prompt ("put the red block on the blue
plate") and ends when the simulator judges the task done or after `episode_s`. Each has a control
loop and a client of its own: a loop signs off from the server when it ends (refresh cleared,
session ended), and the next starts clean. An arm without a task runs one episode for the whole
time, the plain control loop. The summary has the loop's keys over all episodes (counts summed,
percentiles over every tick and chunk) and `episodes`, `episodes_succeeded`. With `rerun`
(`--rerun`) every episode's loop logs to it, one after the other on the robot's `step` timeline.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from robots.base import Robot
from runtime.robot.chunk_buffer import append_bounded
from runtime.robot.control_loop import ControlLoop, LoopClient, LoopSettings, LoopStatus
from runtime.robot.rerun_log import RobotLog

if TYPE_CHECKING:
    from robots.tasks import PickPlaceTask


class EpisodeArm(Robot, Protocol):
    """What the episodes drive: a robot whose `safe_action` the buffer holds on underrun (None: the
    last action again) and whose `task` is the simulated arm's (`robots.sim.SimArm`, which then
    says its `prompt` and `success`), or None: a robot without one runs one plain episode."""

    safe_action: tuple[float, ...] | None
    task: PickPlaceTask | None


class EpisodeClient(LoopClient, Protocol):
    """A loop client that is closed after its episode (`transport.zmq_client.PolicyClient`)."""

    def close(self) -> None: ...


@dataclasses.dataclass
class Tally:
    """Episodes started, and those whose task the simulator judged done."""

    started: int = 0
    succeeded: int = 0


# Summary keys that add up over episodes; the loop's other keys are recomputed from its samples.
_SUMMED = (
    "ticks", "underruns", "chunks_received", "stale_chunks", "subtasks_seen", "refresh_count", "outages", "outage_s",
    "server_restarts", "request_errors",
)  # fmt: skip


@dataclasses.dataclass
class _Totals:
    """The finished loops' summaries, kept as sums and samples, so that one summary covers all
    (keys the loop adds that are neither are the last episode's)."""

    last: dict[str, Any] = dataclasses.field(default_factory=dict)
    counts: dict[str, float] = dataclasses.field(default_factory=dict)
    intervals: int = 0  # between ticks of one loop, and the time they took: the overall rate
    seconds: float = 0.0
    jitter_ms: list[float] = dataclasses.field(default_factory=list)
    delays_ms: list[float] = dataclasses.field(default_factory=list)
    delays_steps: list[int] = dataclasses.field(default_factory=list)
    depths: list[int] = dataclasses.field(default_factory=list)

    def add(self, loop: ControlLoop) -> None:
        summary = self.last = loop.summary()
        for key in _SUMMED:
            self.counts[key] = self.counts.get(key, 0) + summary[key]
        if summary["achieved_hz"]:
            self.intervals += summary["ticks"] - 1
            self.seconds += (summary["ticks"] - 1) / summary["achieved_hz"]
        m = loop.buffer.metrics
        for mine, theirs in (
            (self.jitter_ms, loop.jitter_ms), (self.delays_ms, m.delays_ms),
            (self.delays_steps, m.delays_steps), (self.depths, m.depths),
        ):  # fmt: skip
            for value in theirs:
                append_bounded(mine, value)

    def summary(self) -> dict[str, Any]:
        def pct(values: list[float], q: float) -> float | None:
            return float(np.percentile(values, q)) if values else None

        return {
            **self.last,
            **{key: self.counts.get(key, 0) for key in _SUMMED},
            "achieved_hz": self.intervals / self.seconds if self.seconds > 0 else 0.0,
            "jitter_ms_p50": pct(self.jitter_ms, 50),
            "jitter_ms_p99": pct(self.jitter_ms, 99),
            "inference_delay_ms_p50": pct(self.delays_ms, 50),
            "inference_delay_ms_p99": pct(self.delays_ms, 99),
            "inference_delay_steps_p50": pct(self.delays_steps, 50),
            "inference_delay_steps_max": max(self.delays_steps) if self.delays_steps else None,
            "buffer_depth_min": min(self.depths) if self.depths else None,
        }


class TaskEpisodes:
    """Runs `arm`'s episodes until `run`'s duration passes or `stop()`; `on_tick` sees each tick's
    status with the tally. `make_client` is called on the thread that runs them, once per episode."""

    def __init__(
        self,
        arm: EpisodeArm,
        make_client: Callable[[], EpisodeClient],
        settings: LoopSettings,
        pub: str | None,
        episode_s: float = 15.0,
        on_tick: Callable[[LoopStatus, Tally], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        rerun: RobotLog | None = None,
    ):
        self.arm = arm
        self.tally = Tally()
        self._make_client = make_client
        self._settings = settings
        self._pub = pub
        self._episode_s = episode_s
        self._on_tick = on_tick
        self._clock = clock
        self._rerun = rerun
        self._totals = _Totals()
        self._loop: ControlLoop | None = None
        self._stopped = threading.Event()

    def run(self, duration_s: float | None = None) -> dict[str, Any]:
        """Episodes until `duration_s` (None: until `stop()`); returns the summary. Raises the
        client's error (e.g. `ServerUnreachable`) when an episode's first chunk cannot be had."""
        start = self._clock()
        while not self._stopped.is_set():
            left = None if duration_s is None else duration_s - (self._clock() - start)
            if left is not None and left <= 0:
                break
            self._episode(left)
            if self.arm.task is None:  # its one episode ran the whole time (its ticks end just short of it)
                break
        return self.summary()

    def _episode(self, left_s: float | None) -> None:
        arm = self.arm
        if self.tally.started:
            arm.reset()  # a new scene
        settings = dataclasses.replace(
            self._settings,
            prompt=arm.prompt if arm.task is not None else self._settings.prompt,
            buffer=dataclasses.replace(self._settings.buffer, safe_action=arm.safe_action),
        )
        lengths = [s for s in (left_s, self._episode_s if arm.task is not None else None) if s is not None]
        client = self._make_client()
        loop = ControlLoop(arm, client, settings, self._pub, on_tick=self._tick, rerun=self._rerun)
        self._loop = loop
        try:
            if not self._stopped.is_set():
                self.tally.started += 1
                loop.run(min(lengths) if lengths else None)
        finally:
            client.close()
            self._totals.add(loop)
            if arm.task is not None and arm.success:
                self.tally.succeeded += 1

    def _tick(self, status: LoopStatus) -> None:
        if self.arm.task is not None and self.arm.success and self._loop is not None:
            self._loop.stop()  # the task is done: the next episode draws a new scene
        if self._on_tick is not None:
            self._on_tick(status, self.tally)

    def stop(self) -> None:
        """Ends the current episode after its tick, and the run with it (from any thread)."""
        self._stopped.set()
        if self._loop is not None:
            self._loop.stop()

    def summary(self) -> dict[str, Any]:
        """The loops' keys over every episode so far, and the tally."""
        return {
            **self._totals.summary(),
            "episodes": self.tally.started,
            "episodes_succeeded": self.tally.succeeded,
        }
