"""The `Robot` interface the control loop drives."""

from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np


@dataclasses.dataclass(frozen=True)
class RobotObservation:
    """Camera name -> HxWx3 uint8 (Pi0.5 camera slots), and the proprioceptive state."""

    images: dict[str, np.ndarray]
    state: np.ndarray


class Robot(Protocol):
    control_hz: float
    action_dim: int

    def observe(self) -> RobotObservation: ...

    def act(self, action: np.ndarray) -> None: ...

    def reset(self) -> RobotObservation: ...
