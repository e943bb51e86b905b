"""A stand-in for a LeRobot SO-101 follower arm, for tests without LeRobot or hardware.

It keeps LeRobot's `Robot` interface as its source has it (`src/lerobot/robots/robot.py`, the
SO-100/101 follower in `src/lerobot/robots/so_follower/`, `so101_follower/` before 0.5): the
class attributes `name` and `robot_type`/`id`; `observation_features` (`"<motor>.pos"` -> `float`
for each of its six motors, then each camera's name -> (height, width, 3)) and `action_features`
(the motors' entries), both there before it connects; `is_connected`, `is_calibrated`,
`connect(calibrate=True)`, `calibrate()`, `configure()`, `get_observation()` (a flat dict: a float
per motor, an HxWx3 uint8 RGB frame per camera), `send_action(action)` (returns the action it
sent to the motors: the `.pos` entries), `disconnect()`; and LeRobot's errors: reading, acting or
disconnecting while not connected raises `DeviceNotConnectedError`, connecting twice
`DeviceAlreadyConnectedError` (both `ConnectionError`s, as LeRobot's are). The motors reach each
goal at once; every action sent is kept in `sent`.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

SO101_MOTORS = ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper")


class DeviceNotConnectedError(ConnectionError):
    """As LeRobot's (`lerobot.utils.errors`): the device is used before `connect()`."""


class DeviceAlreadyConnectedError(ConnectionError):
    """As LeRobot's (`lerobot.utils.errors`): `connect()` on a connected device."""


class StandInSO101:
    """An SO-101 follower with `cameras` (name -> (height, width)); `fail_connect` makes `connect`
    raise as LeRobot's does when its port is not there."""

    name = "so101_follower"

    def __init__(
        self,
        robot_id: str = "standin",
        cameras: dict[str, tuple[int, int]] | None = None,
        fail_connect: bool = False,
    ):
        self.robot_type = self.name
        self.id = robot_id
        self.cameras = {"front": (240, 320), "wrist": (240, 320)} if cameras is None else cameras
        self.positions = {motor: float(i) for i, motor in enumerate(SO101_MOTORS)}
        self.sent: list[dict[str, Any]] = []
        self.connects = 0
        self.disconnects = 0
        self._fail_connect = fail_connect
        self._connected = False
        self._frame = 0

    def __str__(self) -> str:
        return f"{self.id} {self.__class__.__name__}"

    def __enter__(self) -> StandInSO101:
        self.connect()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.disconnect()

    @functools.cached_property
    def observation_features(self) -> dict[str, type | tuple]:
        motors: dict[str, type | tuple] = {f"{motor}.pos": float for motor in SO101_MOTORS}
        return {**motors, **{name: (h, w, 3) for name, (h, w) in self.cameras.items()}}

    @functools.cached_property
    def action_features(self) -> dict[str, type]:
        return {f"{motor}.pos": float for motor in SO101_MOTORS}

    @property
    def is_connected(self) -> bool:
        return self._connected

    @property
    def is_calibrated(self) -> bool:
        return True

    def connect(self, calibrate: bool = True) -> None:
        if self._connected:
            raise DeviceAlreadyConnectedError(f"{self} is already connected.")
        if self._fail_connect:
            raise ConnectionError("Could not connect on port '/dev/ttyACM0'. Make sure you are using the correct port.")
        if not self.is_calibrated and calibrate:
            self.calibrate()
        self._connected = True
        self.configure()
        self.connects += 1

    def calibrate(self) -> None:
        """Nothing to calibrate: its motors and its calibration always agree."""

    def configure(self) -> None:
        """Nothing to configure: no motor registers."""

    def get_observation(self) -> dict[str, Any]:
        self._check_connected()
        obs: dict[str, Any] = {f"{motor}.pos": value for motor, value in self.positions.items()}
        self._frame += 1
        for i, (name, (h, w)) in enumerate(self.cameras.items()):
            obs[name] = np.full((h, w, 3), (self._frame + 40 * i) % 256, np.uint8)
        return obs

    def send_action(self, action: dict[str, Any]) -> dict[str, Any]:
        self._check_connected()
        goal = {key.removesuffix(".pos"): value for key, value in action.items() if key.endswith(".pos")}
        self.positions.update({motor: float(value) for motor, value in goal.items() if motor in self.positions})
        sent = {f"{motor}.pos": value for motor, value in goal.items()}
        self.sent.append(sent)
        return sent

    def disconnect(self) -> None:
        self._check_connected()
        self._connected = False
        self.disconnects += 1

    def _check_connected(self) -> None:
        if not self._connected:
            raise DeviceNotConnectedError(f"{self.__class__.__name__} is not connected. Run `.connect()` first.")
