"""Where the demo policy's training frames come from: the scripted expert, and the policy itself.

Behaviour cloning on the expert's episodes alone teaches the expert's actions on the expert's
states. A policy that errs a little drifts into states those episodes never show and errs more
there (compounding error: the demo policy closes its gripper away from any block, then its
subtask says it is carrying one). Two remedies, both here. Half of the expert's episodes execute
its actions with noise on the gripper's motion and with premature grasps that close on nothing (the
labels stay the clean actions), so the data shows how to come back to the path and how to undo a
missed grasp (DART). And
`policy_episodes` runs the policy being trained, in-process and batched over episodes, and labels
every state it visits with the expert's chunk from there (DAgger): the frames show the way back from
the policy's own mistakes.

Every frame carries the expert's chunk of `horizon` actions from its state; frames of an episode
are consecutive, `tick` counting from its first (the batch maker reaches back along an episode for
an older subtask).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from configs.model_config import ModelConfig
from policy.model import pi05
from policy.normalize import Normalizer
from policy.prompts import Prompts
from robots.expert import ScriptedExpert, rollout
from robots.sim import SimArm
from robots.tasks import PickPlaceTask, Scene


@dataclasses.dataclass
class Frame:
    """One tick: the arm and scene before acting, and the expert's chunk from there. `q` and
    `gripper` put the arm back for rendering; `state` is what the robot reports (`SimArm.state`)."""

    q: np.ndarray
    gripper: float
    state: np.ndarray
    scene: Scene
    prompt: str
    subtask: str
    episode: int
    tick: int
    chunk: np.ndarray


@dataclasses.dataclass
class Demonstrations:
    frames: list[Frame]
    actions: list[np.ndarray]  # per episode: (ticks, action dim), the expert's clean actions
    episodes: int
    successes: int


def demonstrations(
    task: PickPlaceTask,
    episodes: int,
    horizon: int,
    seed: int,
    image_size: int,
    noise: float = 0.3,
    done_ticks: int = 5,
    fumble: float = 0.02,
) -> Demonstrations:
    """Runs the expert; every tick up to `done_ticks` after success is a frame, with its chunk of
    `horizon` actions (recorded on past the last frame: the expert holds still once done). Few "done"
    frames: enough to learn to say it and hold still, too few for "done" to be a likely guess."""
    expert = ScriptedExpert(task)
    frames: list[Frame] = []
    actions: list[np.ndarray] = []
    successes = 0
    for e in range(episodes):
        rng = np.random.default_rng([seed, e])
        arm = SimArm(image_size=image_size, seed=int(rng.integers(2**31)), task=task)
        prompt = arm.prompt
        ep_frames: list[Frame] = []
        ep_actions: list[np.ndarray] = []
        ep_noise, ep_fumble = (noise, fumble) if e % 2 else (0.0, 0.0)
        ticks = rollout(arm, expert, 600, rng, ep_noise, after_success=horizon + done_ticks, fumble=ep_fumble)
        for tick, (_, action) in enumerate(ticks):
            ep_frames.append(
                Frame(arm.q.copy(), arm.gripper, arm.state, arm.scene.copy(), prompt, arm.subtask, e, tick, action)
            )
            ep_actions.append(action)
        successes += arm.success
        ep = np.asarray(ep_actions, np.float32)
        last = len(ep_actions) - horizon  # the last tick whose whole chunk was recorded
        frames += [dataclasses.replace(f, chunk=ep[f.tick : f.tick + horizon]) for f in ep_frames if f.tick <= last]
        actions.append(ep)
    return Demonstrations(frames, actions, episodes, successes)


def expert_chunk(arm: SimArm, expert: ScriptedExpert, horizon: int) -> np.ndarray:
    """The expert's next `horizon` actions from the arm's state, played out on the arm itself and
    then undone, so the caller's episode goes on from where it was."""
    saved = (arm.q.copy(), arm.gripper, arm.scene.copy(), arm.steps)
    chunk = []
    for _ in range(horizon):
        action = expert.act(arm)
        chunk.append(action)
        arm.act(action)
    arm.q, arm.gripper, arm.scene, arm.steps = saved
    return np.asarray(chunk, np.float32)


@dataclasses.dataclass
class PolicyEpisodes:
    frames: list[Frame]
    episodes: int
    successes: int


def policy_episodes(
    params: dict,
    cfg: ModelConfig,
    norm: Normalizer,
    prompts: Prompts,
    task: PickPlaceTask,
    episodes: int,
    seed: int,
    first_index: int,
    execute: int = 10,
    max_ticks: int = 300,
    batch: int = 16,
) -> PolicyEpisodes:
    """Runs the policy on `episodes` new scenes, `batch` arms per model call, and returns every
    tick as a frame labelled with the expert's chunk (episode numbers from `first_index`, after
    the expert's). Each arm executes `execute` actions of each chunk (the server's clients execute
    a few and ask again) until success or `max_ticks`. The action prompt carries the simulator's
    subtask, as in the expert's frames: the frames teach actions, the subtask is taught by its own
    loss."""
    expert = ScriptedExpert(task)
    size = cfg.siglip.image_size
    keys = cfg.image_keys
    frames: list[Frame] = []
    successes = 0
    for first in range(0, episodes, batch):
        count = min(batch, episodes - first)
        arms = []
        for e in range(first, first + count):
            rng = np.random.default_rng([seed, first_index + e])
            arms.append(SimArm(image_size=size, seed=int(rng.integers(2**31)), task=task))
        prompts_ = [arm.prompt for arm in arms]
        ticks = [0] * count
        done = [False] * count
        recorded: list[list[Frame]] = [[] for _ in range(count)]
        key = jax.random.key(seed * 1_000_003 + first_index + first)
        while not all(done):
            images = np.zeros((batch, len(keys), size, size, 3), np.uint8)
            tokens = np.zeros((batch, cfg.max_token_len), np.int32)
            mask = np.zeros((batch, cfg.max_token_len), bool)
            for i, arm in enumerate(arms):
                if done[i]:
                    continue  # its row stays blank: rows do not affect each other
                views = arm.render()
                images[i] = np.stack([views[k] for k in keys])
                state = norm.normalize_state(arm.state)
                tokens[i], mask[i] = prompts.tokenize(prompts.action_text(prompts_[i], state, arm.subtask))
            obs = pi05.Observation(jnp.asarray(images), jnp.ones((batch, len(keys)), bool), tokens, mask)
            key, draw = jax.random.split(key)
            noise = jax.random.normal(draw, (batch, cfg.action_horizon, cfg.action_dim), jnp.float32)
            chunks = np.asarray(pi05.sample_actions_jit(params, obs, noise, jnp.int32(cfg.num_steps), cfg))
            for i, arm in enumerate(arms):
                if done[i]:
                    continue
                actions = norm.unnormalize_actions(chunks[i])[:, : arm.action_dim]
                for action in actions[:execute]:
                    recorded[i].append(
                        Frame(
                            arm.q.copy(), arm.gripper, arm.state, arm.scene.copy(), prompts_[i], arm.subtask,
                            first_index + first + i, ticks[i], expert_chunk(arm, expert, cfg.action_horizon),
                        )
                    )  # fmt: skip
                    arm.act(action)
                    ticks[i] += 1
                    if arm.success or ticks[i] >= max_ticks:
                        done[i] = True
                        successes += arm.success
                        break
        frames += [f for episode in recorded for f in episode]  # an episode's frames consecutive
    return PolicyEpisodes(frames, episodes, successes)
