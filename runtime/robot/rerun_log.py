"""One robot's control loops in a `RerunSink` (`--rerun`), their steps on one timeline.

A loop counts its steps from 0, and a robot running episodes runs one loop after another
(`TaskEpisodes`): each run's steps continue after the last tick the run before it executed, so that
the `step` timeline is the robot's ticks from its first on, episode after episode. The loop holds one
of these only when `--rerun` is given, and calls it where it observes, merges a chunk, acts and hears
a subtask; each call only enqueues (`RerunSink`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from runtime.rerun_sink import RerunSink


class RobotLog:
    """`robot_id`'s entities in `sink`; camera images shown at the model's input resolution
    `image_size` (None: as sent)."""

    def __init__(self, sink: RerunSink, robot_id: str, image_size: int | None = None):
        self.sink = sink
        self.robot_id = robot_id
        self.image_size = image_size
        self._base = 0  # the robot's tick of the current run's step 0
        self._end = 0  # one past the robot's last executed tick

    def start_run(self) -> None:
        """A new loop starts at step 0: it continues the robot's ticks."""
        self._base = self._end

    def observation(self, step: int, images: Mapping[str, np.ndarray], state: np.ndarray) -> None:
        self.sink.log_images(self.robot_id, self._base + step, images, self.image_size)
        self.sink.log_state(self.robot_id, self._base + step, state)

    def chunk(self, step: int, obs_step: int, actions: np.ndarray, period_s: float, latency_ms: float) -> None:
        """A chunk computed from the observation of `obs_step` arriving at `step`, as planned."""
        self.sink.log_planned(self.robot_id, self._base + step, self._base + obs_step, actions, period_s)
        self.sink.log_latency(self.robot_id, self._base + step, latency_ms)

    def executed(self, step: int, action: np.ndarray) -> None:
        self._end = self._base + step + 1
        self.sink.log_executed(self.robot_id, self._base + step, action)

    def subtask(self, step: int, text: str, refresh_count: int | None = None) -> None:
        self.sink.log_subtask(self.robot_id, self._base + step, text, refresh_count)
