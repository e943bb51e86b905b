"""Any robot environment in openpi's layout becomes a `Robot`, through its adapter.

openpi's runtime drives an `Environment` with `reset()`, `get_observation()` (a dict in the
robot's own layout: DROID, ALOHA or LIBERO keys) and `apply_action({"actions": ...})`. Wrapped
here with the matching adapter, such an environment runs under `ControlLoop` without glue code:
observations are mapped to Pi0.5's cameras and state, and each action the loop hands over is
mapped back (e.g. ALOHA's joint flips and gripper conversion) before it reaches the robot.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from robots.adapters import Adapter
from robots.base import RobotObservation


class Environment(Protocol):
    def reset(self) -> None: ...

    def get_observation(self) -> dict[str, Any]: ...

    def apply_action(self, action: dict[str, Any]) -> None: ...


class EnvironmentRobot:
    def __init__(self, env: Environment, adapter: Adapter, control_hz: float, model_action_dim: int = 32):
        self.env = env
        self.adapter = adapter
        self.control_hz = control_hz
        # The actions the server sends: the model's 32 dims, or the robot's when it has norm stats;
        # the adapter cuts them down to the robot's own layout.
        self.action_dim = model_action_dim

    def observe(self) -> RobotObservation:
        inputs = self.adapter.to_model(self.env.get_observation())
        return RobotObservation(images=inputs.images, state=inputs.state.astype(np.float32))

    def act(self, action: np.ndarray) -> None:
        robot_action = self.adapter.from_model(np.asarray(action, np.float64)[None])[0]
        self.env.apply_action({"actions": robot_action})

    def reset(self) -> RobotObservation:
        self.env.reset()
        return self.observe()
