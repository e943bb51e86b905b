"""Does the demo policy go for the block the prompt names, and does its subtask name the right place?
The shipped checkpoint against random weights.

In-process, no server. Acting: `runtime.training.demo_data.policy_episodes` runs the policy on new scenes
(batched, 10 actions executed per chunk, the simulator's own subtask in the action prompt, so a wrong
subtask cannot be the cause), and each episode's frames say which block the gripper reached first
(came within grasp range of). With three blocks on the table, a policy that reaches blocks but has
not learnt which colour the prompt names picks the named one about one time in three.

Naming: the subtask names the place it goes to ("reach for the red block at 3"), and through the
stack the action expert goes where the subtask says, so the place token is where the cameras must be
read. On the expert's frames of new scenes (the first reach frame and the first move frame of each),
the cross-entropy of the true place token given the prompt, the state, the cameras and the subtask's
words before it (teacher forcing, `policy.model.training.text_loss`), with the real cameras and with
cameras that contradict the label: the named block's colour swapped with another block's (reach),
the plate drawn in its other place (move). A policy that reads the cameras does much worse on the
contradicting ones; one that guesses does the same on both.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bench.report import write_section
from configs import DEMO_MODEL, SHIPPED_CHECKPOINTS, get_model_config
from policy.checkpoint import load_params
from policy.model import params as params_lib
from policy.model import training
from policy.normalize import Normalizer, checkpoint_normalizer
from policy.prompts import Prompts
from policy.tokenizer import load_tokenizer
from robots.sim import SimArm, forward_kinematics
from robots.tasks import PLATE_PLACES, PickPlaceTask, Scene
from runtime.training.demo_data import Frame, demonstrations, policy_episodes
from runtime.training.train_demo import BatchMaker


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


_PLACE = 2.0  # any weight but the other tokens' 1
_text_loss = jax.jit(training.text_loss, static_argnames="cfg")


def contradicting(scene: Scene, phase: str) -> Scene:
    """The scene with cameras that contradict the subtask's place: the named block's colour swapped
    with the next block's (reach), or the plate in its other place (move)."""
    scene = scene.copy()
    if phase == "reach":
        colours = list(scene.block_colours)
        other = (scene.target + 1) % len(colours)
        colours[scene.target], colours[other] = colours[other], colours[scene.target]
        scene.block_colours = tuple(colours)
    else:
        place = scene.plate_places[scene.goal]
        scene.plates = scene.plates.copy()
        scene.plates[scene.goal] += PLATE_PLACES[1 - place] - PLATE_PLACES[place]
    return scene


def place_nll(params: dict, frames: list[Frame], norm: Normalizer, contradict: bool) -> float:
    """Mean cross-entropy (nats) of the place token of the frames' subtasks."""
    cfg = get_model_config(DEMO_MODEL)
    task = PickPlaceTask()
    # The training's own subtask rows; its place weight marks the position scored on the place.
    maker = BatchMaker(cfg, [], norm, load_tokenizer(cfg), task, place_weight=_PLACE)
    arm = SimArm(image_size=cfg.siglip.image_size, task=task)
    images, rows = [], []
    for f in frames:
        scene = contradicting(f.scene, f.subtask.split()[0]) if contradict else f.scene
        arm.q, arm.gripper, arm.scene = f.q, f.gripper, scene
        views = arm.render()
        images.append(np.stack([views[k] for k in cfg.image_keys]))
        tokens, mask, ar, weights = maker.text(f.prompt, norm.normalize_state(f.state), f.subtask)
        rows.append((tokens, mask, ar, (weights == _PLACE).astype(np.float32)))
    tokens, mask, ar, weights = (np.stack(x) for x in zip(*rows, strict=True))
    n = len(frames)
    batch = training.Batch(
        images=np.stack(images),
        image_mask=np.ones((n, len(cfg.image_keys)), bool),
        action_tokens=tokens,
        action_mask=mask,
        text_tokens=tokens,
        text_mask=mask,
        text_ar=ar,
        text_loss=weights,
        actions=np.zeros((n, cfg.action_horizon, cfg.action_dim), np.float32),
    )
    return float(_text_loss(params, batch, cfg))


def naming(params: dict, args: argparse.Namespace) -> dict:
    cfg = get_model_config(DEMO_MODEL)
    norm = checkpoint_normalizer(cfg, Path(args.checkpoint) / "assets")
    demos = demonstrations(PickPlaceTask(), args.episodes, cfg.action_horizon, args.seed, 8, noise=0.0, fumble=0.0)
    out = {}
    for phase in ("reach", "move"):
        frames = {}
        for f in demos.frames:
            if f.subtask.startswith(phase):
                frames.setdefault(f.episode, f)
        chosen = list(frames.values())
        out[phase] = (place_nll(params, chosen, norm, False), place_nll(params, chosen, norm, True))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(SHIPPED_CHECKPOINTS[DEMO_MODEL]))
    parser.add_argument("--episodes", type=int, default=30)
    parser.add_argument("--seed", type=int, default=100, help="scenes: not the training demonstrations' seeds")
    parser.add_argument("--max-ticks", type=int, default=500, help="ticks per episode (50 Hz)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cfg = get_model_config(DEMO_MODEL)
    policies = [
        ("shipped checkpoint", load_params(Path(args.checkpoint) / "params", cfg, dtype=jnp.float32)),
        ("random weights (baseline)", params_lib.init_params(cfg, seed=0, dtype=jnp.float32)),
    ]
    rows = [(label, measure(params, args)) for label, params in policies]
    names = [(label, naming(params, args)) for label, params in policies]
    n = args.episodes

    def nats(pair: tuple[float, float]) -> str:
        return f"{pair[0]:.2f} (p {np.exp(-pair[0]):.2f}) | {pair[1]:.2f} (p {np.exp(-pair[1]):.2f})"

    body = (
        f"`{DEMO_MODEL}` in-process, {n} new scenes (seed {args.seed}), at most {args.max_ticks} ticks at 50 Hz, "
        "10 actions executed per chunk, the simulator's own subtask in the action prompt. First block reached: "
        "the first block the gripper came within grasp range of. With three blocks, chance is one in three.\n\n"
        "| policy | first block reached: the named one | another one | none | task done |\n|---|---|---|---|---|\n"
        + "\n".join(
            f"| {label} | {r['named']} of {n} | {r['other']} | {n - r['named'] - r['other']} | {r['successes']} |"
            for label, r in rows
        )
        + "\n\nNaming the place: the cross-entropy of the true place token in the subtask, in nats (p: e to the "
        "minus that, the geometric mean of its probability), on the first reach frame and the first move frame of "
        f"the expert's episodes on the same {n} scenes, with the real cameras and with cameras that contradict the "
        "label (reach: the named block's colour swapped with another's; move: the plate in its other place). "
        "Chance: 1 in 3 for the block (three places hold one), 1 in 2 for the plate.\n\n"
        "| policy | reach: real cameras | reach: contradicting | move: real cameras | move: contradicting |\n"
        "|---|---|---|---|---|\n"
        + "\n".join(f"| {label} | {nats(r['reach'])} | {nats(r['move'])} |" for label, r in names)
        + "\n"
    )
    command = f"python -m bench.demo_grounding --episodes {n} --seed {args.seed}"
    print(
        write_section(
            "demo_grounding", "Demo policy: does it go for the named block, and name its place?", body, command
        )
    )


if __name__ == "__main__":
    main()
