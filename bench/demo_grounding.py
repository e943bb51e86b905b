"""Does the demo policy go for the block the prompt names? The shipped checkpoint against random weights.

In-process, no server: `policy.demo_data.policy_episodes` runs the policy on new scenes (batched,
10 actions executed per chunk, the simulator's own subtask in the action prompt, so a wrong subtask
cannot be the cause), and each episode's frames say which block the gripper reached first (came
within grasp range of). With three blocks on the table, a policy that reaches blocks but has not
learnt which colour the prompt names picks the named one about one time in three.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from bench.report import write_section
from configs import DEMO_MODEL, SHIPPED_CHECKPOINTS, get_model_config
from policy import params as params_lib
from policy.checkpoint import load_params
from policy.demo_data import Frame, policy_episodes
from policy.normalize import checkpoint_normalizer
from policy.prompts import Prompts
from policy.tokenizer import load_tokenizer
from robots.sim import SimArm, forward_kinematics
from robots.tasks import PickPlaceTask


def first_reached(frames: list[Frame], task: PickPlaceTask, link_length: float) -> int | None:
    """The index of the first block the gripper came within grasp range of, if any."""
    for f in frames:
        ee = forward_kinematics(f.q, link_length)[-1]
        near = np.flatnonzero(np.linalg.norm(f.scene.blocks - ee, axis=1) <= task.grasp_radius)
        if len(near):
            return int(near[0])
    return None


def measure(params: dict, args: argparse.Namespace) -> dict:
    cfg = get_model_config(DEMO_MODEL)
    task = PickPlaceTask()
    norm = checkpoint_normalizer(cfg, Path(args.checkpoint) / "assets")
    prompts = Prompts(cfg, load_tokenizer(cfg))
    run = policy_episodes(
        params, cfg, norm, prompts, task, args.episodes, args.seed, first_index=0, max_ticks=args.max_ticks
    )
    link = SimArm(image_size=8, task=task).link_length
    named = other = 0
    for e in range(args.episodes):
        frames = [f for f in run.frames if f.episode == e]
        block = first_reached(frames, task, link)
        named += block is not None and block == frames[0].scene.target
        other += block is not None and block != frames[0].scene.target
    return {"named": named, "other": other, "successes": run.successes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(SHIPPED_CHECKPOINTS[DEMO_MODEL]))
    parser.add_argument("--episodes", type=int, default=30)
    parser.add_argument("--seed", type=int, default=100, help="scenes: not the training demonstrations' seeds")
    parser.add_argument("--max-ticks", type=int, default=500, help="ticks per episode (50 Hz)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cfg = get_model_config(DEMO_MODEL)
    rows = [
        ("shipped checkpoint", measure(load_params(Path(args.checkpoint) / "params", cfg, dtype=jnp.float32), args)),
        ("random weights (baseline)", measure(params_lib.init_params(cfg, seed=0, dtype=jnp.float32), args)),
    ]
    n = args.episodes
    body = (
        f"`{DEMO_MODEL}` in-process, {n} new scenes (seed {args.seed}), at most {args.max_ticks} ticks at 50 Hz, "
        "10 actions executed per chunk, the simulator's own subtask in the action prompt. First block reached: "
        "the first block the gripper came within grasp range of. With three blocks, chance is one in three.\n\n"
        "| policy | first block reached: the named one | another one | none | task done |\n|---|---|---|---|---|\n"
        + "\n".join(
            f"| {label} | {r['named']} of {n} | {r['other']} | {n - r['named'] - r['other']} | {r['successes']} |"
            for label, r in rows
        )
        + "\n"
    )
    command = f"python -m bench.demo_grounding --episodes {n} --seed {args.seed}"
    print(write_section("demo_grounding", "Demo policy: does it go for the named block?", body, command))


if __name__ == "__main__":
    main()
