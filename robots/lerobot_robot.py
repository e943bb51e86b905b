"""Any LeRobot robot (an SO-101 arm, a Koch arm, ...) as a `Robot` the control loop drives.

LeRobot's `Robot` (`lerobot/robots/robot.py`) says what it has in `observation_features` (a
motor's `"<motor>.pos"` -> `float`, a camera's name -> its (height, width, channels)) and what it
takes in `action_features`, and trades flat dicts of those names: `get_observation()` and
`send_action(action)`, between `connect()` and `disconnect()`. Pi0.5 takes a state vector and
images in its camera slots and gives action vectors. A checkpoint trained on a LeRobot dataset
names its cameras by the dataset's `observation.images.<camera>` keys (the server's ping:
`camera_aliases`, alias -> the model's camera slot); its state is the robot's motors in the robot's
order, as the dataset recorded them. `map_lerobot` ties the robot's names to the model's once, from
the features alone (they are there before the robot connects), and refuses a robot that cannot
drive the model in one line; `LeRobotRobot` then maps each observation and action.

LeRobot itself is imported only by `make_lerobot_device`, for `--robot lerobot`: a robot-side
install stays light, and `pip install 'pi05-runtime[lerobot]'` adds it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import pkgutil
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

import numpy as np

from robots.adapters import LEROBOT_IMAGES, to_hwc_uint8
from robots.base import RobotObservation
from robots.server_model import Mismatch, ServerModel

log = logging.getLogger(__name__)

INSTALL = "pip install 'pi05-runtime[lerobot]'"


class LeRobotDevice(Protocol):
    """LeRobot's `Robot`, the part this adapter uses: the abstract class's names and shapes."""

    @property
    def observation_features(self) -> dict[str, Any]: ...

    @property
    def action_features(self) -> dict[str, Any]: ...

    @property
    def is_connected(self) -> bool: ...

    def connect(self, calibrate: bool = True) -> None: ...

    def disconnect(self) -> None: ...

    def get_observation(self) -> dict[str, Any]: ...

    def send_action(self, action: dict[str, Any]) -> dict[str, Any]: ...


class LeRobotSetupError(ValueError):
    """LeRobot's robot cannot be made as the flags say (LeRobot not installed, an unknown type, a
    config it refuses): one line, naming the fix."""


class LeRobotConnectError(ConnectionError):
    """The robot did not connect (a port that is not there, a camera that does not open): one line."""


@dataclasses.dataclass(frozen=True)
class LeRobotMapping:
    """The robot's names for what the model takes and gives."""

    state_keys: tuple[str, ...]  # observation entries, in the model's state order
    cameras: tuple[tuple[str, str], ...]  # (the robot's camera, the model's camera slot)
    action_keys: tuple[str, ...]  # the robot's action entries: the model's first action dims, in order

    def describe(self) -> str:
        cameras = ", ".join(f"{camera} -> {slot}" for camera, slot in self.cameras)
        return (
            f"state {len(self.state_keys)} ({', '.join(self.state_keys)}), cameras {cameras}, "
            f"actions {len(self.action_keys)} ({', '.join(self.action_keys)})"
        )


def _is_scalar(feature: Any) -> bool:
    """A feature LeRobot describes by its type (`float` for a motor's position): one state value."""
    return isinstance(feature, type) and issubclass(feature, int | float)


def _is_color_camera(feature: Any) -> bool:
    """A feature LeRobot describes by its shape (height, width, 3): a color camera. A depth
    camera's (height, width, 1) is no image Pi0.5 takes."""
    return isinstance(feature, tuple) and len(feature) == 3 and feature[2] == 3


def map_lerobot(
    observation_features: Mapping[str, Any], action_features: Mapping[str, Any], model: ServerModel
) -> LeRobotMapping:
    """The robot's entries for the model's state, cameras and actions. Raises `Mismatch` when the
    robot cannot drive the model: state or action counts that do not fit, state names or cameras
    the checkpoint names and the robot lacks."""
    motors = [name for name, feature in observation_features.items() if _is_scalar(feature)]
    state = _state_keys(motors, model)
    actions = tuple(action_features)
    if model.action_dim < len(actions):
        raise Mismatch(
            f"the server's model {model.config} gives {model.action_dim} action values; the robot takes "
            f"{len(actions)} ({', '.join(actions)}): serve a checkpoint trained on this robot"
        )
    cameras = [name for name, feature in observation_features.items() if _is_color_camera(feature)]
    if not cameras:
        raise Mismatch(
            f"the robot has no color camera and the server's model {model.config} takes cameras "
            f"{', '.join(model.image_keys)}: give it cameras with --lerobot-cameras"
        )
    return LeRobotMapping(state, _camera_slots(cameras, model), actions)


def _state_keys(motors: list[str], model: ServerModel) -> tuple[str, ...]:
    """The robot's scalar entries in the robot's order (LeRobot's datasets record `observation.state`
    in it; a checkpoint's config.json keeps only its size), as many as the model's state takes (a
    model without norm stats takes any)."""
    if model.state_dim is not None and model.state_dim != len(motors):
        raise Mismatch(
            f"the server's model {model.config} takes {model.state_dim} state values; the robot has "
            f"{len(motors)} ({', '.join(motors)}): serve a checkpoint trained on this robot"
        )
    return tuple(motors)


def _camera_slots(cameras: list[str], model: ServerModel) -> tuple[tuple[str, str], ...]:
    """Each robot camera's model slot: by the checkpoint's aliases when the server reports them,
    else the robot's cameras in order to the model's slots in order. A camera without a slot is
    not sent; a slot without a camera is masked by the server."""
    if model.camera_aliases is None:
        slots = tuple(zip(cameras, model.image_keys, strict=False))
        log.info(
            "the server names no camera aliases: the robot's cameras fill the model's slots in order: %s",
            ", ".join(f"{camera} -> {slot}" for camera, slot in slots),
        )
    else:
        aliases = model.camera_aliases
        # A checkpoint's camera aliases name a camera as a LeRobot dataset does, or by the camera alone.
        named = ((camera, aliases.get(LEROBOT_IMAGES + camera, aliases.get(camera))) for camera in cameras)
        slots = tuple((camera, slot) for camera, slot in named if slot is not None)
        if not slots:
            raise Mismatch(
                f"the server's model {model.config} takes cameras named {', '.join(sorted(aliases))}; the "
                f"robot's are {', '.join(cameras)}: name them in --lerobot-cameras as its dataset did"
            )
        taken = [slot for _, slot in slots]
        if len(set(taken)) < len(taken):
            raise Mismatch(
                f"the robot's cameras {', '.join(c for c, _ in slots)} fill the model's slots "
                f"{', '.join(taken)}: one camera per slot"
            )
    unsent = [camera for camera in cameras if camera not in {c for c, _ in slots}]
    if unsent:
        log.warning("the robot's cameras %s have no slot in the model: not sent", ", ".join(unsent))
    return slots


class LeRobotRobot:
    """A LeRobot robot as a `Robot`: its observation dict to the model's state and camera slots,
    the model's first actions to its action dict, as `mapping` says.

    It has no simulated task (`TaskEpisodes` runs one plain episode for the whole run). Its safe
    action is None: on an underrun or an outage the buffer repeats the last target, so a
    position-controlled arm holds where it is; a fixed pose would jump it back there."""

    task = None
    safe_action: tuple[float, ...] | None = None

    def __init__(self, device: LeRobotDevice, mapping: LeRobotMapping, control_hz: float):
        self.device = device
        self.mapping = mapping
        self.control_hz = control_hz
        self.action_dim = len(mapping.action_keys)

    def observe(self) -> RobotObservation:
        obs = self.device.get_observation()
        missing = [k for k in (*self.mapping.state_keys, *(c for c, _ in self.mapping.cameras)) if k not in obs]
        if missing:
            raise ValueError(f"the robot's observation lacks {', '.join(missing)}, which its features name")
        state = np.array([obs[key] for key in self.mapping.state_keys], np.float32)
        images = {slot: to_hwc_uint8(camera, obs[camera]) for camera, slot in self.mapping.cameras}
        return RobotObservation(images=images, state=state)

    def act(self, action: np.ndarray) -> None:
        values = np.asarray(action, np.float64).ravel()[: self.action_dim]
        self.device.send_action({key: float(v) for key, v in zip(self.mapping.action_keys, values, strict=True)})

    def reset(self) -> RobotObservation:
        """A real robot has no scene to draw anew: what it observes now."""
        return self.observe()

    @contextlib.contextmanager
    def connected(self) -> Iterator[LeRobotRobot]:
        """Connected for the run and disconnected after it, after an error or Ctrl-C too: LeRobot's
        robots then let go of their ports and cameras (an SO-101 also turns its torque off). Connects
        as LeRobot's own tools do, calibrating a robot whose motors and calibration file disagree."""
        try:
            self.device.connect()
        except (OSError, RuntimeError, ValueError) as e:  # LeRobot's: ConnectionError, a motor or camera refusing
            raise LeRobotConnectError(f"the LeRobot robot did not connect: {_one_line(e)}") from e
        try:
            yield self
        finally:
            if self.device.is_connected:
                self.device.disconnect()
                log.info("the robot is disconnected")


def fit_lerobot(device: LeRobotDevice, model: ServerModel, control_hz: float) -> LeRobotRobot:
    """`device` set up to drive the server's `model` (not yet connected); `Mismatch` if it cannot."""
    mapping = map_lerobot(device.observation_features, device.action_features, model)
    log.info("the LeRobot robot, set up for %s: %s", model.label, mapping.describe())
    return LeRobotRobot(device, mapping, control_hz)


# ----------------------------------------------------------------------------- LeRobot's registry


def make_lerobot_device(
    robot_type: str, port: str | None = None, robot_id: str | None = None, cameras: str | None = None
) -> LeRobotDevice:
    """LeRobot's robot of `robot_type` (e.g. `so101_follower`), its config decoded through
    LeRobot's own registry as `lerobot-record --robot.type=... --robot.port=... --robot.id=...
    --robot.cameras=...` does: `cameras` in the same form, JSON or LeRobot's
    `{front: {type: opencv, index_or_path: 0, width: 640, height: 480, fps: 30}}`. Not connected."""
    try:
        from lerobot.robots import RobotConfig, make_robot_from_config
    except ImportError as e:
        raise LeRobotSetupError(f"--robot lerobot needs LeRobot ({e}): {INSTALL}") from None
    import draccus  # LeRobot's own: its config library, and the YAML its flags are parsed with
    import yaml

    _register_lerobot_configs()
    known = RobotConfig.get_known_choices()
    if robot_type not in known:
        raise LeRobotSetupError(f"--lerobot-type {robot_type!r} is no LeRobot robot; known: {', '.join(sorted(known))}")
    raw: dict[str, Any] = {"type": robot_type}
    for key, value in (("port", port), ("id", robot_id)):
        if value is not None:
            raw[key] = value
    if cameras is not None:
        try:
            raw["cameras"] = yaml.safe_load(cameras)
        except yaml.YAMLError as e:
            raise LeRobotSetupError(f"--lerobot-cameras is neither JSON nor YAML: {_one_line(e)}") from None
        if not isinstance(raw["cameras"], dict):
            raise LeRobotSetupError(
                "--lerobot-cameras must map camera names to LeRobot camera configs, e.g. "
                "'{front: {type: opencv, index_or_path: 0, width: 640, height: 480, fps: 30}}'"
            )
    try:
        config = draccus.decode(RobotConfig, raw)
        return make_robot_from_config(config)
    except ImportError as e:  # a motor or camera SDK of LeRobot's extras
        raise LeRobotSetupError(
            f"LeRobot's {robot_type} needs {e.name or e}: install LeRobot's extra for it "
            "(pi05-runtime[lerobot] brings lerobot[feetech], the SO-100/SO-101's)"
        ) from None
    except Exception as e:  # draccus' decoding errors, LeRobot's checks of a config: the message says which
        # draccus names a config it could not make and chains LeRobot's reason (a camera without a width, say).
        reason = f"{str(e).rstrip('.')}: {e.__cause__}" if e.__cause__ is not None else str(e)
        raise LeRobotSetupError(f"LeRobot's {robot_type} config: {_one_line(reason)}") from None


def _one_line(error: object) -> str:
    """An error's message on one line: YAML's and draccus' span several."""
    return " ".join(str(error).split())


def _register_lerobot_configs() -> None:
    """LeRobot registers a robot's or a camera's config class when its package is imported, and
    `lerobot.robots` imports none (LeRobot's scripts import each by name): import every one there
    is, leaving out those whose own dependencies are not installed (a camera SDK, say)."""
    import lerobot.cameras
    import lerobot.robots

    for package in (lerobot.robots, lerobot.cameras):
        for module in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
            if not module.ispkg:
                continue
            try:
                importlib.import_module(module.name)
            except Exception as e:  # a robot or camera not asked for, without its SDK
                log.debug("LeRobot's %s is not available: %s", module.name, e)
