"""The simulated arm: deterministic, rendered, and moved by its actions."""

from __future__ import annotations

import numpy as np

from robots.sim import SimArm


def test_deterministic_for_a_seed():
    a, b = SimArm(seed=3), SimArm(seed=3)
    for _ in range(5):
        a.act(np.full(4, 0.01))
        b.act(np.full(4, 0.01))
    oa, ob = a.observe(), b.observe()
    np.testing.assert_array_equal(oa.state, ob.state)
    for k in oa.images:
        np.testing.assert_array_equal(oa.images[k], ob.images[k])
    assert not np.array_equal(SimArm(seed=4).observe().state, oa.state)


def test_motion_follows_actions_with_a_speed_limit():
    arm = SimArm(n_joints=3, control_hz=50, max_joint_speed=2.0)
    q0 = arm.q.copy()
    arm.act(np.array([0.01, -0.01, 1.0, 0.7]))  # the last joint asks for more than 2 rad/s
    np.testing.assert_allclose(arm.q - q0, [0.01, -0.01, 0.04])
    assert arm.gripper == 0.7 and arm.state.shape == (4,)


def test_cameras_see_the_arm_move():
    arm = SimArm(seed=1)
    before = arm.observe()
    assert set(before.images) == {"base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb"}
    assert all(img.shape == (224, 224, 3) and img.dtype == np.uint8 for img in before.images.values())
    for _ in range(20):
        arm.act(np.array([0.04, 0.0, 0.0, 1.0]))
    after = arm.observe()
    changed = np.mean(np.any(before.images["base_0_rgb"] != after.images["base_0_rgb"], axis=-1))
    assert changed > 0.002  # the arm's pixels moved
    # The gripper colour follows the gripper command.
    assert not np.array_equal(before.images["left_wrist_0_rgb"], after.images["left_wrist_0_rgb"])
