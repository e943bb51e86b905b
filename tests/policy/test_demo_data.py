"""`runtime.training.demo_data`: the expert's chunks, and DAgger's frames from the policy's own episodes."""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from configs import get_model_config
from policy.model import params as params_lib
from policy.prompts import Prompts
from policy.tokenizer import load_tokenizer
from robots.expert import ScriptedExpert
from robots.sim import SimArm
from robots.tasks import PickPlaceTask
from runtime.training import train_demo as td
from runtime.training.demo_data import demonstrations, expert_chunk, policy_episodes

TICKS = 20
EXECUTE = 5


@pytest.fixture(scope="module")
def task():
    return PickPlaceTask()


@pytest.fixture(scope="module")
def run(task):
    cfg = get_model_config("pi05_demo")
    demos = demonstrations(task, 2, cfg.action_horizon, seed=0, image_size=cfg.siglip.image_size)
    norm = td.normalizer(td.norm_stats(demos))
    params = params_lib.init_params(cfg, seed=0, dtype=jnp.float32)  # a policy that has learnt nothing
    prompts = Prompts(cfg, load_tokenizer(cfg))
    out = policy_episodes(
        params, cfg, norm, prompts, task, episodes=3, seed=0, first_index=2, execute=EXECUTE, max_ticks=TICKS, batch=2
    )
    return cfg, demos, out


def _arm_at(task, frame, size):
    arm = SimArm(image_size=size, task=task)
    arm.q, arm.gripper, arm.scene = frame.q.copy(), frame.gripper, frame.scene.copy()
    return arm


def test_expert_chunk_leaves_the_arm_where_it_was(task):
    arm = SimArm(image_size=48, seed=3, task=task)
    for _ in range(40):  # into the episode, so the chunk crosses the grasp
        arm.act(ScriptedExpert(task).act(arm))
    before = (arm.q.copy(), arm.gripper, arm.scene.copy(), arm.steps)
    chunk = expert_chunk(arm, ScriptedExpert(task), 30)
    assert chunk.shape == (30, arm.action_dim)
    np.testing.assert_array_equal(arm.q, before[0])
    assert arm.gripper == before[1] and arm.steps == before[3] and arm.scene.held == before[2].held
    np.testing.assert_array_equal(arm.scene.blocks, before[2].blocks)
    # Played out for real, the arm does what the chunk said (float32, as training stores it).
    for action in chunk:
        np.testing.assert_allclose(action, ScriptedExpert(task).act(arm), rtol=0, atol=1e-6)
        arm.act(action)


def test_policy_frames_are_the_policys_states_labelled_with_the_experts_chunks(task, run):
    cfg, demos, out = run
    assert out.episodes == 3 and out.successes == 0  # random weights never do the task
    episodes = [[f for f in out.frames if f.episode == e] for e in (2, 3, 4)]
    # Every tick of every episode, consecutive, numbered after the expert's episodes.
    assert [len(e) for e in episodes] == [TICKS] * 3 and len(out.frames) == 3 * TICKS
    assert [f.episode for f in out.frames] == sorted(f.episode for f in out.frames)
    for frames in episodes:
        assert [f.tick for f in frames] == list(range(TICKS))
    # New scenes, not the expert's.
    starts = {tuple(e[0].scene.blocks.ravel()) for e in episodes}
    assert not starts & {tuple(f.scene.blocks.ravel()) for f in demos.frames if f.tick == 0}
    expert = ScriptedExpert(task)
    off_path = 0
    for frames in episodes:
        for f, nxt in itertools.pairwise(frames):
            # The label is the expert's chunk from exactly this state...
            np.testing.assert_array_equal(f.chunk, expert_chunk(_arm_at(task, f, 48), expert, cfg.action_horizon))
            # ...while the episode moves on by the policy's action, not the expert's.
            off_path += not np.allclose(nxt.q, _after(task, f, f.chunk[0]).q)
            assert f.subtask == _arm_at(task, f, 48).subtask
    assert off_path >= 0.9 * 3 * (TICKS - 1)


def _after(task, frame, action):
    arm = _arm_at(task, frame, 48)
    arm.act(action)
    return arm
