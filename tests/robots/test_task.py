"""The pick-and-place task: its scripted expert succeeds, its phases advance, its physics hold."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from robots.expert import ScriptedExpert, inverse_kinematics, rollout
from robots.sim import SimArm, forward_kinematics
from robots.tasks import COLOURS, PHASES, PickPlaceTask


@pytest.fixture
def task() -> PickPlaceTask:
    return PickPlaceTask()


def test_the_expert_succeeds_in_nearly_all_seeds_with_and_without_noise(task):
    expert = ScriptedExpert(task)
    results = []
    for seed in range(40):
        arm = SimArm(image_size=8, seed=seed, task=task)
        noise = 0.3 if seed % 2 else 0.0
        ticks = sum(1 for _ in rollout(arm, expert, 500, np.random.default_rng(seed), noise))
        results.append((arm.success, ticks))
    assert sum(ok for ok, _ in results) >= 39
    assert max(t for ok, t in results if ok) < 300  # under 6 s at 50 Hz


def test_the_phase_labels_change_along_an_expert_episode_in_order(task):
    arm = SimArm(image_size=8, seed=5, task=task)
    colour = arm.scene.block_colours[arm.scene.target]
    texts = []
    phases = []
    for phase, _ in rollout(arm, ScriptedExpert(task), 500):
        phases.append(phase)
        texts.append(arm.subtask)
    assert [p for p, _ in itertools.groupby(phases)] == ["reach", "grasp", "move", "release"]
    distinct = [t for t, _ in itertools.groupby(texts)]
    assert len(distinct) == 4 and all(colour in t for t in distinct)
    assert arm.success and arm.phase == "done"


def test_scenes_are_random_per_episode_and_deterministic_per_seed(task):
    a, b = SimArm(seed=3, task=task), SimArm(seed=3, task=task)
    np.testing.assert_array_equal(a.scene.blocks, b.scene.blocks)
    assert a.prompt == b.prompt
    prompts = {SimArm(seed=s, task=task).prompt for s in range(20)}
    assert len(prompts) > 5
    first = a.scene.blocks.copy()
    a.reset()
    assert not np.array_equal(first, a.scene.blocks)
    assert a.scene.target < task.n_blocks and a.scene.goal < task.n_plates
    gaps = np.linalg.norm(a.scene.blocks[:, None] - a.scene.plates[None], axis=-1)
    assert gaps.min() >= task.min_gap


def test_the_cameras_show_the_scene(task):
    arm = SimArm(image_size=48, seed=1, task=task)
    images = arm.observe().images
    assert all(img.shape == (48, 48, 3) and img.dtype == np.uint8 for img in images.values())
    base = images["base_0_rgb"].reshape(-1, 3)
    for name in arm.scene.block_colours:
        assert (base == np.array(COLOURS[name], np.uint8)).all(axis=1).sum() >= 4, name


def test_grasp_carry_and_release(task):
    arm = SimArm(seed=2, task=task, image_size=8)
    scene = arm.scene
    block = scene.blocks[scene.target].copy()
    arm.q = inverse_kinematics(block, arm.n_joints, arm.link_length)
    assert arm.phase == "grasp"
    arm.act(np.array([0, 0, 0, 0.5]))
    assert scene.held is None  # half closed does not hold
    arm.act(np.array([0, 0, 0, 1.0]))
    assert scene.held == scene.target and arm.phase == "move"
    arm.act(np.array([0.04, 0, 0, 1.0]))
    np.testing.assert_allclose(scene.blocks[scene.target], arm.joint_positions()[-1])
    assert not np.allclose(scene.blocks[scene.target], block)
    arm.act(np.array([0, 0, 0, 0.0]))
    assert scene.held is None and not arm.success  # dropped off the plate
    assert arm.phase in ("reach", "grasp")


def test_inverse_kinematics_reaches_the_goal():
    for goal in ([0.3, 0.4], [-0.6, 0.2], [0.0, 0.85], [0.5, 0.5]):
        q = inverse_kinematics(np.array(goal), 3, 1 / 3)
        np.testing.assert_allclose(forward_kinematics(q, 1 / 3)[-1], goal, atol=1e-9)
        assert np.all(np.abs(q) <= np.pi)
    with pytest.raises(ValueError, match="2 or 3 joints"):
        inverse_kinematics(np.array([0.3, 0.3]), 4, 0.25)


def test_every_phase_has_a_subtask_text(task):
    arm = SimArm(seed=0, task=task, image_size=8)
    texts = {p: task.subtask(arm.scene, p) for p in PHASES}
    assert len(set(texts.values())) == len(PHASES)


def test_an_arm_without_a_task_says_so():
    with pytest.raises(ValueError, match="no task"):
        _ = SimArm(image_size=8).prompt
