"""A simulated planar arm that needs nothing but numpy.

A chain of `n_joints` links on a table, a gripper, and a block to reach. Actions are joint-angle
deltas per control tick plus a gripper command in [0, 1]; joint speeds are limited, so motion
follows the actions it is given, smoothly. Three cameras fill Pi0.5's slots: an overhead view
(`base_0_rgb`) and two close-ups that follow the gripper and the block (`left_wrist_0_rgb`,
`right_wrist_0_rgb`). Deterministic for a given seed.
"""

from __future__ import annotations

import itertools

import numpy as np

from robots.adapters import BASE, LEFT_WRIST, RIGHT_WRIST
from robots.base import RobotObservation

_BACKGROUND = np.array([235, 228, 214], np.float32)
_LINK = np.array([60, 90, 160], np.float32)
_GRIPPER_OPEN = np.array([40, 170, 80], np.float32)
_GRIPPER_CLOSED = np.array([200, 60, 50], np.float32)
_BLOCK = np.array([230, 160, 30], np.float32)


class SimArm:
    def __init__(
        self,
        n_joints: int = 3,
        control_hz: float = 50.0,
        image_size: int = 224,
        max_joint_speed: float = 2.0,
        seed: int = 0,
    ):
        self.n_joints = n_joints
        self.control_hz = control_hz
        self.action_dim = n_joints + 1
        # With no plan left the arm stands still (no joint motion) with its gripper open.
        self.safe_action = (0.0,) * self.action_dim
        self.image_size = image_size
        self.max_step = max_joint_speed / control_hz  # rad per tick
        self.link_length = 1.0 / n_joints
        self._rng = np.random.default_rng(seed)
        grid = (np.arange(image_size) + 0.5) / image_size
        self._gx, self._gy = np.meshgrid(grid, grid)  # pixel centres in [0, 1]
        self.steps = 0
        self.reset()

    def reset(self) -> RobotObservation:
        self.q = self._rng.uniform(-0.5, 0.5, self.n_joints)
        self.gripper = 0.0
        angle, radius = self._rng.uniform(0, np.pi), self._rng.uniform(0.3, 0.9)
        self.block = np.array([np.cos(angle), np.sin(angle)]) * radius
        self.steps = 0
        return self.observe()

    @property
    def state(self) -> np.ndarray:
        return np.concatenate([self.q, [self.gripper]]).astype(np.float32)

    def joint_positions(self) -> np.ndarray:
        """(n_joints + 1, 2) positions of the base, each joint and the end effector, in metres."""
        angles = np.cumsum(self.q)
        steps = self.link_length * np.stack([np.cos(angles), np.sin(angles)], axis=1)
        return np.concatenate([np.zeros((1, 2)), np.cumsum(steps, axis=0)])

    def act(self, action: np.ndarray) -> None:
        action = np.asarray(action, np.float64).ravel()
        if action.shape[0] < self.action_dim:
            raise ValueError(f"the sim arm takes {self.action_dim} action values, got {action.shape[0]}")
        delta = np.clip(np.nan_to_num(action[: self.n_joints]), -self.max_step, self.max_step)
        self.q = np.clip(self.q + delta, -np.pi, np.pi)
        self.gripper = float(np.clip(np.nan_to_num(action[self.n_joints]), 0.0, 1.0))
        self.steps += 1

    def observe(self) -> RobotObservation:
        joints = self.joint_positions()
        ee = joints[-1]
        images = {
            BASE: self._render(joints, centre=np.array([0.0, 0.5]), half_width=1.1),
            LEFT_WRIST: self._render(joints, centre=ee, half_width=0.3),
            RIGHT_WRIST: self._render(joints, centre=self.block, half_width=0.3),
        }
        return RobotObservation(images=images, state=self.state)

    def _render(self, joints: np.ndarray, centre: np.ndarray, half_width: float) -> np.ndarray:
        # World coordinates of every pixel (y up), then paint by distance to each shape.
        wx = centre[0] + (self._gx - 0.5) * 2 * half_width
        wy = centre[1] - (self._gy - 0.5) * 2 * half_width
        img = np.broadcast_to(_BACKGROUND, (self.image_size, self.image_size, 3)).copy()
        pixel = 2 * half_width / self.image_size
        block = (np.abs(wx - self.block[0]) < 0.06) & (np.abs(wy - self.block[1]) < 0.06)
        img[block] = _BLOCK
        for a, b in itertools.pairwise(joints):
            img[_segment_distance(wx, wy, a, b) < max(0.02, pixel)] = _LINK
        colour = _GRIPPER_OPEN + (_GRIPPER_CLOSED - _GRIPPER_OPEN) * self.gripper
        img[np.hypot(wx - joints[-1][0], wy - joints[-1][1]) < max(0.045, 2 * pixel)] = colour
        return img.astype(np.uint8)


def _segment_distance(px: np.ndarray, py: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ab = b - a
    t = np.clip(((px - a[0]) * ab[0] + (py - a[1]) * ab[1]) / max(float(ab @ ab), 1e-12), 0.0, 1.0)
    return np.hypot(px - (a[0] + t * ab[0]), py - (a[1] + t * ab[1]))
