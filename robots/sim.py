"""A simulated planar arm that needs nothing but numpy.

A chain of `n_joints` links on a table, a gripper, and a block to reach. Actions are joint-angle
deltas per control tick plus a gripper command in [0, 1]; joint speeds are limited, so motion
follows the actions it is given, smoothly. Three cameras fill Pi0.5's slots: an overhead view
(`base_0_rgb`) and two close-ups that follow the gripper and the block (`left_wrist_0_rgb`,
`right_wrist_0_rgb`; `cameras` picks those a model takes). Deterministic for a given seed.

With a `task` (`robots.tasks`), the table holds that task's scene instead of the lone block: each
reset draws a new scene, the gripper grasps, carries and releases blocks, the cameras show the
scene (the right close-up then follows the gripper with a wider view), and `prompt`, `phase`,
`subtask` and `success` say what the task asks and how far it got.

A task's arm is position-controlled in end-effector space, as many robot-learning datasets' arms
are: an action is where the gripper should be (x, y) in metres plus the gripper command, and the
state is the gripper's position and closure. The controller moves the gripper toward its target at
up to `max_ee_speed` (an inverse-kinematics posture per point, within the joint speed limit), and
with no new action the arm holds its last target. Its fingers move toward the gripper command at
`gripper_speed` (closure per second) and report where they are, as a real gripper reports its
width: closed on a block they stop at the block's width (the task's `grip_at`), closed on nothing
they go on to 1. A policy can then tell a missed grasp from a held block; when the state said only
what was commanded, a closed gripper always meant "carrying" in the demonstrations, and a policy
that closed a few centimetres short went on to "move" with nothing in its fingers. A small policy
learns this from its cameras far faster than joint deltas: the action is where the named block is,
not a motion that also depends on where the gripper and the joints are now (the demo policy trained
on joint deltas used neither its cameras nor its prompt). Without a task the arm takes joint deltas.
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

# Pi0.5's three camera slots, all of which the arm can fill.
CAMERAS = (BASE, LEFT_WRIST, RIGHT_WRIST)
_BACKGROUND = np.array([235, 228, 214], np.float32)
# Arm colours unlike any block's (red, blue, green, black), so a camera never mistakes the arm for one.
_LINK = np.array([150, 140, 130], np.float32)
_GRIPPER_OPEN = np.array([250, 200, 40], np.float32)
_GRIPPER_CLOSED = np.array([180, 70, 210], np.float32)
_BLOCK = np.array([230, 160, 30], np.float32)

# Camera views: (centre, half width) in metres. The overhead camera is fixed; the others follow the gripper
# (or, without a task, the block).
BASE_VIEW = (np.array([0.0, 0.5]), 0.8)
_WRIST_HALF_WIDTH = 0.3
_TASK_WIDE_HALF_WIDTH = 1.3
# Metres: how far `inverse_kinematics` keeps the wrist off the point one link short of the goal.
_WRIST_SLACK = 0.15


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
        max_ee_speed: float = 0.5,
        gripper_speed: float = 3.0,
        cameras: tuple[str, ...] = CAMERAS,
    ):
        self.n_joints = n_joints
        self.control_hz = control_hz
        # With a task: the gripper's target (x, y) and command; without: joint deltas and gripper.
        self.action_dim = 3 if task is not None else n_joints + 1
        # With no plan left a joint-driven arm stands still (no motion) with its gripper open; a
        # position-controlled one holds its last target (None: the chunk buffer repeats it).
        self.safe_action: tuple[float, ...] | None = None if task is not None else (0.0,) * self.action_dim
        self.image_size = image_size
        unknown = set(cameras) - set(CAMERAS)
        if unknown or not cameras:
            raise ValueError(f"the sim arm's cameras are {', '.join(CAMERAS)}; got {', '.join(cameras) or 'none'}")
        # The cameras it sends: a model that takes fewer gets only those (it rejects unknown ones).
        self.cameras = cameras
        self.max_step = max_joint_speed / control_hz  # rad per tick
        self.max_ee_step = max_ee_speed / control_hz  # metres per tick
        self.gripper_step = gripper_speed / control_hz  # closure per tick, a task arm's fingers
        self.link_length = 1.0 / n_joints
        self.task = task
        self.scene: Scene | None = None
        self._rng = np.random.default_rng(seed)
        self._grid = (np.arange(image_size) + 0.5) / image_size  # pixel centres in [0, 1]
        self.steps = 0
        self.reset()

    def reset(self) -> RobotObservation:
        self.gripper = 0.0
        if self.task is None:
            self.q = self._rng.uniform(-0.5, 0.5, self.n_joints)
            angle, radius = self._rng.uniform(0, np.pi), self._rng.uniform(0.3, 0.9)
            self.block = np.array([np.cos(angle), np.sin(angle)]) * radius
        else:
            # The gripper starts anywhere over the table, the arm in its controller's posture.
            angle, radius = self._rng.uniform(0.1 * np.pi, 0.9 * np.pi), self._rng.uniform(0.3, 0.9)
            start = np.array([np.cos(angle), np.sin(angle)]) * radius
            self.q = inverse_kinematics(start, self.n_joints, self.link_length)
            self.scene = self.task.new_scene(self._rng)
        self.steps = 0
        return self.observe()

    @property
    def state(self) -> np.ndarray:
        """Joint angles and gripper; with a task, the gripper's position (x, y) and its fingers'
        closure, as a real gripper reports its width: 1 closed on nothing, `grip_at` on a block."""
        if self.task is not None:
            return np.concatenate([self.joint_positions()[-1], [self.gripper]]).astype(np.float32)
        return np.concatenate([self.q, [self.gripper]]).astype(np.float32)

    def joint_positions(self) -> np.ndarray:
        """(n_joints + 1, 2) positions of the base, each joint and the end effector, in metres."""
        return forward_kinematics(self.q, self.link_length)

    def act(self, action: np.ndarray) -> None:
        action = np.asarray(action, np.float64).ravel()
        if action.shape[0] < self.action_dim:
            raise ValueError(f"the sim arm takes {self.action_dim} action values, got {action.shape[0]}")
        command = float(np.clip(np.nan_to_num(action[self.action_dim - 1]), 0.0, 1.0))
        if self.task is None:
            delta = np.clip(np.nan_to_num(action[: self.n_joints]), -self.max_step, self.max_step)
            self.q = np.clip(self.q + delta, -np.pi, np.pi)
            self.gripper = command
        else:
            # The controller: at most `max_ee_step` toward the target (a non-finite one is where the
            # gripper is), by joint motion toward the posture that puts the gripper there, the short
            # way round (its joints turn freely).
            ee = self.joint_positions()[-1]
            move = np.nan_to_num(action[:2] - ee)
            length = float(np.hypot(*move))
            if length > self.max_ee_step:
                move *= self.max_ee_step / length
            goal = inverse_kinematics(ee + move, self.n_joints, self.link_length)
            delta = np.clip(_wrap(goal - self.q), -self.max_step, self.max_step)
            self.q = _wrap(self.q + delta)
            # The fingers move toward the command at `gripper_step` per tick; the task says where
            # they stop (on a block they grasp) and what they hold.
            before = self.gripper
            closure = before + float(np.clip(command - before, -self.gripper_step, self.gripper_step))
            self.gripper = self.task.update(self.scene, self.joint_positions()[-1], before, closure)
        self.steps += 1

    def observe(self) -> RobotObservation:
        return RobotObservation(images=self.render(), state=self.state)

    def render(self) -> dict[str, np.ndarray]:
        """The images of the arm's `cameras` of the current state."""
        joints = self.joint_positions()
        if self.task is None:
            shapes = [Shape("square", self.block, 0.06, _BLOCK)]
            right = (self.block, _WRIST_HALF_WIDTH)
        else:
            shapes = self.task.shapes(self.scene)
            right = (joints[-1], _TASK_WIDE_HALF_WIDTH)
        views = {BASE: BASE_VIEW, LEFT_WRIST: (joints[-1], _WRIST_HALF_WIDTH), RIGHT_WRIST: right}
        return {name: render_view(self._grid, joints, self.gripper, shapes, *views[name]) for name in self.cameras}

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


def inverse_kinematics(goal: np.ndarray, n_joints: int, link_length: float) -> np.ndarray:
    """Joint angles in (-pi, pi] that put the end effector on `goal`, one posture per goal (so the
    controller never flips the arm) that changes smoothly with it. With 3 joints the last link
    points away from the base, turned counterclockwise so that the wrist lies `_WRIST_SLACK` off the
    point one link short of the goal: pointing straight away would fold the arm onto itself for a
    goal one link from the base, where it cannot move. The elbow bends counterclockwise. Out of
    reach: as far as it goes."""
    if n_joints not in (2, 3):
        raise ValueError(f"the end-effector controller drives arms of 2 or 3 joints, not {n_joints}")
    goal = np.asarray(goal, np.float64)
    bearing = float(np.arctan2(goal[1], goal[0]))
    wrist, last = goal, bearing
    if n_joints == 3:
        r = float(np.hypot(*goal))
        w = float(np.hypot(r - link_length, _WRIST_SLACK))
        cos_turn = (r**2 + link_length**2 - w**2) / max(2 * r * link_length, 1e-12)
        last = bearing + float(np.arccos(np.clip(cos_turn, -1.0, 1.0)))
        wrist = goal - link_length * np.array([np.cos(last), np.sin(last)])
    d2 = float(wrist @ wrist)
    elbow = float(np.arccos(np.clip((d2 - 2 * link_length**2) / (2 * link_length**2), -1.0, 1.0)))
    shoulder = float(np.arctan2(wrist[1], wrist[0]) - np.arctan2(np.sin(elbow), 1 + np.cos(elbow)))
    q = [shoulder, elbow] if n_joints == 2 else [shoulder, elbow, last - shoulder - elbow]
    return _wrap(np.asarray(q))


def _wrap(angles: np.ndarray) -> np.ndarray:
    """Angles wrapped into (-pi, pi]."""
    return np.angle(np.exp(1j * angles))


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
