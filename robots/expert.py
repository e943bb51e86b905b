"""The scripted expert of the pick-and-place task: what the demonstrations show the policy.

It reads the simulator's state (the scene, the gripper's position and closure) and acts by the
task's phase: reach moves the gripper to the named block, grasp keeps centring on it while closing
the gripper, move carries it to the named plate, release keeps centring on the plate while opening,
done holds still with the gripper open. Fingers that closed on nothing (closure past the task's
`grip_at` with no block held) open again before the next try: the way back from a missed grasp.

Its action is the task arm's (`robots.sim`): where the gripper should go, the goal of the phase
itself; the arm's controller gets it there at its own speed. Everything is a function of the state,
so the same state always gets the same action.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from robots.sim import SimArm
from robots.tasks import PickPlaceTask, Scene


@dataclasses.dataclass(frozen=True)
class ScriptedExpert:
    task: PickPlaceTask

    def act(self, arm: SimArm) -> np.ndarray:
        """The action (target x, target y, gripper command) for the arm's current state."""
        return self.action(arm.scene, arm.joint_positions()[-1], arm.gripper)

    def action(self, scene: Scene, ee: np.ndarray, gripper: float) -> np.ndarray:
        phase = self.task.phase(scene, ee)
        if phase in ("reach", "grasp"):
            goal = scene.blocks[scene.target]
        elif phase in ("move", "release"):
            goal = scene.plates[scene.goal]
        else:
            goal = ee
        # Grasp closes the fingers, unless they already closed on nothing: then open, and close again.
        close = {"grasp": float(gripper < self.task.grip_at), "move": 1.0}.get(phase, 0.0)
        return np.concatenate([goal, [close]])


def rollout(
    arm: SimArm,
    expert: ScriptedExpert,
    max_ticks: int,
    rng: np.random.Generator | None = None,
    noise: float = 0.0,
    after_success: int = 0,
    fumble: float = 0.0,
):
    """Runs the expert from the arm's current state until success (then `after_success` ticks more,
    holding still) or `max_ticks`.

    Yields (phase, expert action) per tick before acting. With `noise` > 0 the executed target gets
    Gaussian noise of `noise` x 10 cm (the labels stay clean), so demonstrations also show how to
    come back to the path. With `fumble` > 0, each tick of the reach phase starts a premature grasp
    with that probability: the executed gripper command closes for 10 to 25 ticks, on nothing (the
    labels stay open), so demonstrations also show how a missed grasp is undone."""
    left = None
    fumbling = 0
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
        if rng is not None and left is None:
            if noise > 0:
                executed[:2] += rng.normal(0.0, noise * 0.1, 2)
            if fumbling == 0 and fumble > 0 and arm.phase == "reach" and rng.random() < fumble:
                fumbling = int(rng.integers(10, 26))
            if fumbling > 0:
                executed[-1] = 1.0
                fumbling -= 1
        arm.act(executed)
