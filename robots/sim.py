"""A simulated planar arm that needs nothing but numpy.

A chain of `n_joints` links on a table, a gripper, and a block to reach. Actions are joint-angle
deltas per control tick plus a gripper command in [0, 1]; joint speeds are limited, so motion
follows the actions it is given, smoothly. Three cameras fill Pi0.5's slots: an overhead view
(`base_0_rgb`) and two close-ups that follow the gripper and the block (`left_wrist_0_rgb`,
`right_wrist_0_rgb`). Deterministic for a given seed.

With a `task` (`robots.tasks`), the table holds that task's scene instead of the lone block: each
reset draws a new scene, the gripper grasps, carries and releases blocks, the cameras show the
scene (the right close-up then follows the gripper with a wider view), and `prompt`, `phase`,
`subtask` and `success` say what the task asks and how far it got.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import TYPE_CHECKING

import numpy as np

from robots.adapters import BASE, LEFT_WRIST, RIGHT_WRIST
from robots.base import RobotObservation

if TYPE_CHECKING:
    from robots.tasks import PickPlaceTask, Scene

_BACKGROUND = np.array([235, 228, 214], np.float32)
_LINK = np.array([60, 90, 160], np.float32)
_GRIPPER_OPEN = np.array([40, 170, 80], np.float32)
_GRIPPER_CLOSED = np.array([200, 60, 50], np.float32)
_BLOCK = np.array([230, 160, 30], np.float32)

# Camera views: (centre, half width) in metres. The overhead camera is fixed; the others follow the gripper
# (or, without a task, the block).
BASE_VIEW = (np.array([0.0, 0.5]), 1.1)
_WRIST_HALF_WIDTH = 0.3
_TASK_WIDE_HALF_WIDTH = 0.6


@dataclasses.dataclass(frozen=True)
class Shape:
    """Something on the table to paint: a square (`half` = half side) or a disc (`half` = radius)."""

    kind: str  # "square" | "disc"
    centre: np.ndarray
    half: float
    colour: np.ndarray


class SimArm:
    def __init__(
        self,
        n_joints: int = 3,
        control_hz: float = 50.0,
        image_size: int = 224,
        max_joint_speed: float = 2.0,
        seed: int = 0,
        task: PickPlaceTask | None = None,
    ):
        self.n_joints = n_joints
        self.control_hz = control_hz
        self.action_dim = n_joints + 1
        # With no plan left the arm stands still (no joint motion) with its gripper open.
        self.safe_action = (0.0,) * self.action_dim
        self.image_size = image_size
        self.max_step = max_joint_speed / control_hz  # rad per tick
        self.link_length = 1.0 / n_joints
        self.task = task
        self.scene: Scene | None = None
        self._rng = np.random.default_rng(seed)
        self._grid = (np.arange(image_size) + 0.5) / image_size  # pixel centres in [0, 1]
        self.steps = 0
        self.reset()

    def reset(self) -> RobotObservation:
        self.q = self._rng.uniform(-0.5, 0.5, self.n_joints)
        self.gripper = 0.0
        if self.task is None:
            angle, radius = self._rng.uniform(0, np.pi), self._rng.uniform(0.3, 0.9)
            self.block = np.array([np.cos(angle), np.sin(angle)]) * radius
        else:
            self.scene = self.task.new_scene(self._rng)
        self.steps = 0
        return self.observe()

    @property
    def state(self) -> np.ndarray:
        return np.concatenate([self.q, [self.gripper]]).astype(np.float32)

    def joint_positions(self) -> np.ndarray:
        """(n_joints + 1, 2) positions of the base, each joint and the end effector, in metres."""
        return forward_kinematics(self.q, self.link_length)

    def act(self, action: np.ndarray) -> None:
        action = np.asarray(action, np.float64).ravel()
        if action.shape[0] < self.action_dim:
            raise ValueError(f"the sim arm takes {self.action_dim} action values, got {action.shape[0]}")
        delta = np.clip(np.nan_to_num(action[: self.n_joints]), -self.max_step, self.max_step)
        self.q = np.clip(self.q + delta, -np.pi, np.pi)
        self.gripper = float(np.clip(np.nan_to_num(action[self.n_joints]), 0.0, 1.0))
        self.steps += 1
        if self.task is not None:
            self.task.update(self.scene, self.joint_positions()[-1], self.gripper)

    def observe(self) -> RobotObservation:
        return RobotObservation(images=self.render(), state=self.state)

    def render(self) -> dict[str, np.ndarray]:
        """The three cameras' images of the current state."""
        joints = self.joint_positions()
        if self.task is None:
            shapes = [Shape("square", self.block, 0.06, _BLOCK)]
            right = (self.block, _WRIST_HALF_WIDTH)
        else:
            shapes = self.task.shapes(self.scene)
            right = (joints[-1], _TASK_WIDE_HALF_WIDTH)
        views = {BASE: BASE_VIEW, LEFT_WRIST: (joints[-1], _WRIST_HALF_WIDTH), RIGHT_WRIST: right}
        return {
            name: render_view(self._grid, joints, self.gripper, shapes, centre, half)
            for name, (centre, half) in views.items()
        }

    # ------------------------------------------------------------------ the task's view of the arm

    @property
    def prompt(self) -> str:
        return self._task().prompt(self.scene)

    @property
    def phase(self) -> str:
        return self._task().phase(self.scene, self.joint_positions()[-1])

    @property
    def subtask(self) -> str:
        return self._task().subtask(self.scene, self.phase)

    @property
    def success(self) -> bool:
        return self._task().success(self.scene)

    def _task(self) -> PickPlaceTask:
        if self.task is None:
            raise ValueError("this SimArm has no task (SimArm(task=...))")
        return self.task


def forward_kinematics(q: np.ndarray, link_length: float) -> np.ndarray:
    """(n + 1, 2) positions of the base, each joint and the end effector of a planar chain."""
    angles = np.cumsum(q)
    steps = link_length * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return np.concatenate([np.zeros((1, 2)), np.cumsum(steps, axis=0)])


def render_view(
    grid: np.ndarray,
    joints: np.ndarray,
    gripper: float,
    shapes: list[Shape],
    centre: np.ndarray,
    half_width: float,
) -> np.ndarray:
    """One camera: shapes in order, then the links and the gripper (its colour shows how closed)."""
    size = grid.shape[0]
    # World coordinates of every pixel (y up), then paint by distance to each shape.
    wx = (centre[0] + (grid - 0.5) * 2 * half_width)[None, :]
    wy = (centre[1] - (grid - 0.5) * 2 * half_width)[:, None]
    img = np.broadcast_to(_BACKGROUND, (size, size, 3)).copy()
    pixel = 2 * half_width / size
    for s in shapes:
        dx, dy = wx - s.centre[0], wy - s.centre[1]
        if s.kind == "square":
            inside = (np.abs(dx) < s.half) & (np.abs(dy) < s.half)
        else:
            inside = np.hypot(dx, dy) < s.half
        img[inside] = s.colour
    wx, wy = np.broadcast_arrays(wx, wy)
    for a, b in itertools.pairwise(joints):
        img[_segment_distance(wx, wy, a, b) < max(0.02, pixel)] = _LINK
    colour = _GRIPPER_OPEN + (_GRIPPER_CLOSED - _GRIPPER_OPEN) * gripper
    img[np.hypot(wx - joints[-1][0], wy - joints[-1][1]) < max(0.045, 2 * pixel)] = colour
    return img.astype(np.uint8)


def _segment_distance(px: np.ndarray, py: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ab = b - a
    t = np.clip(((px - a[0]) * ab[0] + (py - a[1]) * ab[1]) / max(float(ab @ ab), 1e-12), 0.0, 1.0)
    return np.hypot(px - (a[0] + t * ab[0]), py - (a[1] + t * ab[1]))
