"""The pick-and-place task: its scripted expert succeeds, its phases advance, its physics hold."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from robots.expert import ScriptedExpert, rollout
from robots.sim import SimArm, forward_kinematics, inverse_kinematics
from robots.tasks import BLOCK_PLACES, COLOURS, PHASES, PLATE_PLACES, PickPlaceTask, without_place


@pytest.fixture
def task() -> PickPlaceTask:
    return PickPlaceTask()


def test_the_expert_succeeds_in_nearly_all_seeds_with_and_without_noise_and_fumbles(task):
    expert = ScriptedExpert(task)
    results = []
    for seed in range(40):
        arm = SimArm(image_size=8, seed=seed, task=task)
        noise, fumble = (0.3, 0.02) if seed % 2 else (0.0, 0.0)
        ticks = sum(1 for _ in rollout(arm, expert, 500, np.random.default_rng(seed), noise, fumble=fumble))
        results.append((arm.success, ticks))
    assert sum(ok for ok, _ in results) >= 39
    assert max(t for ok, t in results if ok) < 400  # under 8 s at 50 Hz


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
    # Reach and move say where they go: the named block's and the named plate's place, from the left.
    place = arm.scene.places[arm.scene.target] + 1
    assert distinct[0].endswith(f"at {place}") and distinct[2].endswith(f"at {arm.scene.plate_places[0] + 1}")


def test_scenes_are_random_per_episode_and_deterministic_per_seed(task):
    a, b = SimArm(seed=3, task=task), SimArm(seed=3, task=task)
    np.testing.assert_array_equal(a.scene.blocks, b.scene.blocks)
    assert a.prompt == b.prompt
    prompts = {SimArm(seed=s, task=task).prompt for s in range(20)}
    assert len(prompts) > 5
    first = a.scene.blocks.copy()
    a.reset()
    assert not np.array_equal(first, a.scene.blocks)
    assert a.scene.target < 3 and a.scene.goal == 0
    # Three blocks in three of the four places, the plate in one of two, each within the jitter.
    scenes = [SimArm(seed=s, task=task, image_size=8).scene for s in range(40)]
    for scene in scenes:
        assert len(scene.places) == 3 == len(set(scene.places)) and len(set(scene.block_colours)) == 3
        assert np.abs(scene.blocks - BLOCK_PLACES[list(scene.places)]).max() <= task.jitter
        assert np.abs(scene.plates - PLATE_PLACES[list(scene.plate_places)]).max() <= task.jitter
    assert {p for scene in scenes for p in scene.places} == {0, 1, 2, 3}
    assert {p for scene in scenes for p in scene.plate_places} == {0, 1}
    assert len({scene.block_colours for scene in scenes}) > 10


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
    ticks = 0
    while scene.held is None:  # the fingers close at the arm's gripper speed, then meet the block
        arm.act(np.array([*block, 1.0]))
        ticks += 1
        assert ticks <= np.ceil(task.grip_at / arm.gripper_step)
    assert ticks == np.ceil(task.grip_at / arm.gripper_step - 1e-9)
    assert scene.held == scene.target and arm.phase == "move"
    for _ in range(5):  # closed on the block, the fingers stay at its width: the state says "holding"
        arm.act(np.array([block[0] + 0.3, block[1], 1.0]))
    assert arm.state[2] == pytest.approx(task.grip_at)
    np.testing.assert_allclose(scene.blocks[scene.target], arm.joint_positions()[-1])
    assert not np.allclose(scene.blocks[scene.target], block)
    while scene.held is not None:
        arm.act(np.array([*arm.state[:2], 0.0]))
    assert arm.gripper <= task.open_at and not arm.success  # dropped off the plate
    assert arm.phase in ("reach", "grasp")


def test_fingers_that_close_on_nothing_close_fully_and_the_expert_opens_them_and_succeeds(task):
    arm = SimArm(seed=6, task=task, image_size=8)
    scene = arm.scene
    away = scene.blocks[scene.target] + np.array([0.0, -0.3])
    arm.q = inverse_kinematics(away, arm.n_joints, arm.link_length)
    for _ in range(40):
        arm.act(np.array([*away, 1.0]))
    assert scene.held is None and arm.state[2] == pytest.approx(1.0)  # unlike holding (grip_at)
    expert = ScriptedExpert(task)
    assert expert.act(arm)[2] == 0.0  # reach: open first
    commands = [action[2] for _, action in rollout(arm, expert, 500)]
    assert arm.success
    assert commands[0] == 0.0 and 1.0 in commands


def test_fumbled_demonstrations_show_missed_grasps_and_their_clean_labels(task):
    expert = ScriptedExpert(task)
    empty_closed, labels = 0, []
    for seed in range(10):
        arm = SimArm(seed=seed, task=task, image_size=8)
        for _, action in rollout(arm, expert, 500, np.random.default_rng(seed), fumble=0.05):
            if arm.scene.held is None and arm.gripper > task.grip_at:
                empty_closed += 1
                labels.append(action[2])
        assert arm.success
    assert empty_closed > 20 and set(labels) == {0.0}  # missed grasps shown, labelled "open"


def test_inverse_kinematics_reaches_the_goal_in_a_posture_that_changes_smoothly():
    for goal in ([0.3, 0.4], [-0.6, 0.2], [0.0, 0.85], [0.5, 0.5], [0.05, 0.1], [-0.64, 0.74]):
        q = inverse_kinematics(np.array(goal), 3, 1 / 3)
        np.testing.assert_allclose(forward_kinematics(q, 1 / 3)[-1], goal, atol=1e-9)
        assert np.all(np.abs(q) <= np.pi)
    # Along a line past the base (where a posture with the last link pointing away from the base
    # folds the arm onto itself, elbow at pi), the elbow stays open and 1 cm of goal never turns a
    # joint by more than 0.1 rad.
    line = [np.array([x, 0.2]) for x in np.arange(-0.8, 0.8, 0.01)]
    postures = np.array([inverse_kinematics(g, 3, 1 / 3) for g in line])
    assert np.abs(postures[:, 1]).max() < 2.8
    assert np.abs(np.angle(np.exp(1j * np.diff(postures, axis=0)))).max() < 0.1
    with pytest.raises(ValueError, match="2 or 3 joints"):
        inverse_kinematics(np.array([0.3, 0.3]), 4, 0.25)


def test_a_task_arm_moves_its_gripper_toward_the_target_at_its_speed_limit_and_holds_it(task):
    arm = SimArm(seed=4, task=task, image_size=8)
    assert arm.action_dim == 3 and arm.safe_action is None  # the chunk buffer repeats the last target
    start = arm.state[:2].copy()
    near = start + np.array([0.005, -0.003])
    arm.act(np.array([*near, 0.0]))
    np.testing.assert_allclose(arm.state, [*near, 0.0], atol=1e-6)
    np.testing.assert_allclose(arm.state[:2], arm.joint_positions()[-1], rtol=1e-6)
    far = near + np.array([0.5, 0.0])
    arm.act(np.array([*far, 0.4]))  # 0.5 m in one tick asked: the controller moves at 0.5 m/s
    np.testing.assert_allclose(arm.state[:2], near + np.array([0.01, 0.0]), atol=1e-6)
    assert arm.state[2] == pytest.approx(arm.gripper_step)  # the fingers too move at their speed
    for _ in range(150):  # within the joint speed limit too
        arm.act(np.array([*far, 1.0]))
    np.testing.assert_allclose(arm.state, [*far, 1.0], atol=1e-6)
    arm.act(np.array([np.nan, np.nan, 1.0]))  # no target: it stays where it is
    np.testing.assert_allclose(arm.state, [*far, 1.0], atol=1e-6)


def test_every_phase_has_a_subtask_text_and_says_which_without_its_place(task):
    arm = SimArm(seed=0, task=task, image_size=8)
    texts = {p: task.subtask(arm.scene, p) for p in PHASES}
    assert len(set(texts.values())) == len(PHASES) == len({without_place(t) for t in texts.values()})
    colour = arm.scene.block_colours[arm.scene.target]
    assert without_place(texts["reach"]) == f"reach for the {colour} block"
    assert without_place(texts["grasp"]) == texts["grasp"] and without_place("done") == "done"
    assert without_place("look at the plate") == "look at the plate"


def test_an_arm_without_a_task_says_so():
    with pytest.raises(ValueError, match="no task"):
        _ = SimArm(image_size=8).prompt
