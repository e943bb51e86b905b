"""The scripted expert of the pick-and-place task: what the demonstrations show the policy.

It reads the simulator's state (the scene, the joint angles and the gripper) and acts by the task's
phase: reach moves the gripper to the named block, grasp keeps centring on it while closing the
gripper, move carries it to the named plate, release keeps centring on the plate while opening,
done holds still with the gripper open. Gripper commands ramp over `gripper_ticks` ticks rather
than jump, so the closing and opening are visible in a few frames of the demonstrations.

Motion is in joint space: analytic inverse kinematics gives the joint angles that put the
gripper on the goal with the last link pointing away from the base and the elbow bent one way (so
the same goal always gets the same arm shape), and the joints move toward them at a rate
proportional to the remaining angle, scaled as a whole to the arm's joint speed limit. Everything is
a function of the state, so the same state always gets the same action. Arms of 2 or 3 joints.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from robots.sim import SimArm, forward_kinematics
from robots.tasks import PickPlaceTask, Scene


@dataclasses.dataclass(frozen=True)
class ScriptedExpert:
    task: PickPlaceTask
    gain: float = 6.0  # 1/s: joint rates are gain * the remaining angle, below the speed limit
    gripper_ticks: int = 8

    def act(self, arm: SimArm) -> np.ndarray:
        """The action (joint deltas, gripper command) for the arm's current state."""
        return self.action(arm.scene, arm.q, arm.gripper, arm.link_length, arm.max_step, arm.control_hz)

    def action(
        self, scene: Scene, q: np.ndarray, gripper: float, link_length: float, max_step: float, control_hz: float
    ) -> np.ndarray:
        ee = forward_kinematics(q, link_length)[-1]
        phase = self.task.phase(scene, ee)
        ramp = 1.0 / self.gripper_ticks
        if phase in ("reach", "grasp"):
            target = inverse_kinematics(scene.blocks[scene.target], q.shape[0], link_length)
        elif phase in ("move", "release"):
            target = inverse_kinematics(scene.plates[scene.goal], q.shape[0], link_length)
        else:
            target = q
        close = {"reach": 0.0, "grasp": min(1.0, gripper + ramp), "move": 1.0}.get(phase, max(0.0, gripper - ramp))
        dq = self.gain * (target - q) / control_hz
        limit = 0.95 * max_step
        biggest = float(np.max(np.abs(dq)))
        if biggest > limit:
            dq *= limit / biggest
        return np.concatenate([dq, [close]])


def inverse_kinematics(goal: np.ndarray, n_joints: int, link_length: float) -> np.ndarray:
    """Joint angles in (-pi, pi] that put the end effector on `goal`: with 3 joints the last link
    points away from the base; the elbow bends counterclockwise. Out of reach: as far as it goes."""
    if n_joints not in (2, 3):
        raise ValueError(f"the scripted expert drives arms of 2 or 3 joints, not {n_joints}")
    goal = np.asarray(goal, np.float64)
    bearing = float(np.arctan2(goal[1], goal[0]))
    wrist = goal - link_length * np.array([np.cos(bearing), np.sin(bearing)]) if n_joints == 3 else goal
    d2 = float(wrist @ wrist)
    elbow = float(np.arccos(np.clip((d2 - 2 * link_length**2) / (2 * link_length**2), -1.0, 1.0)))
    shoulder = float(np.arctan2(wrist[1], wrist[0]) - np.arctan2(np.sin(elbow), 1 + np.cos(elbow)))
    q = [shoulder, elbow] if n_joints == 2 else [shoulder, elbow, bearing - shoulder - elbow]
    return np.angle(np.exp(1j * np.asarray(q)))  # wrapped into (-pi, pi]


def rollout(
    arm: SimArm,
    expert: ScriptedExpert,
    max_ticks: int,
    rng: np.random.Generator | None = None,
    noise: float = 0.0,
    after_success: int = 0,
):
    """Runs the expert from the arm's current state until success (then `after_success` ticks more,
    holding still) or `max_ticks`.

    Yields (phase, expert action) per tick before acting. With `noise` > 0 the executed joint
    deltas get Gaussian noise of that many times the joint speed limit (the labels stay clean), so
    demonstrations also show how to come back to the path."""
    left = None
    for _ in range(max_ticks):
        if left is None and arm.success:
            left = after_success
        if left is not None:
            if left == 0:
                return
            left -= 1
        action = expert.act(arm)
        yield arm.phase, action
        executed = action.copy()
        if noise > 0 and rng is not None and left is None:
            executed[: arm.n_joints] += rng.normal(0.0, noise * arm.max_step, arm.n_joints)
        arm.act(executed)
