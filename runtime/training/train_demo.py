"""`python -m runtime.training`: trains the demo Pi0.5 on the simulated arm's pick-and-place task.

    python -m runtime.training --out /tmp/pi05_demo --seed 0

1. Demonstrations: the scripted expert (`robots.expert`) runs `--episodes` randomised episodes,
   half of them with noise on the executed gripper targets and premature grasps that close on
   nothing (`--fumble`; labels stay the expert's), so the data also shows how to come back to the
   path and how to undo a missed grasp (`runtime.training.demo_data`).
2. Norm stats of the state and the actions (openpi's quantiles), for the checkpoint's assets.
3. Training: each batch renders its frames into the three cameras (48x48 for `pi05_demo`), builds the
   server's own prompts from the normalized state and the phase's subtask, and takes one AdamW step
   on the flow-matching loss of the action chunk plus the cross-entropy of the subtask text
   (`policy.model.training`). A progress line on stderr; the losses in `loss.csv` and `loss.png`.
   At the `--dagger-at` fractions of the steps the policy so far runs `--dagger-episodes` new
   episodes and the expert labels every state it visits (DAgger): later batches draw from those
   frames too, which show the way back from the policy's own mistakes. `--dagger-at` with no
   fraction turns it off.
4. The checkpoint in openpi's layout: `params/` (orbax, float32) and
   `assets/<asset id>/norm_stats.json`, loaded unchanged by
   `python -m runtime.policy_server --config pi05_demo --checkpoint OUT`.

The same `--seed` gives the same demonstrations, batches and initial weights.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import jax
import jax.numpy as jnp
import numpy as np

from configs import get_model_config
from configs.model_config import ModelConfig
from policy.checkpoint import save_params
from policy.model import params as params_lib
from policy.model import training
from policy.normalize import Normalizer, Stats
from policy.prompts import Prompts
from policy.tokenizer import Tokenizer, load_tokenizer
from robots import plot
from robots.sim import SimArm
from robots.tasks import PickPlaceTask
from runtime.training.demo_data import Demonstrations, Frame, demonstrations, policy_episodes

log = logging.getLogger(__name__)


def _stats(x: np.ndarray) -> dict[str, list[float]]:
    return {
        "mean": x.mean(0).tolist(),
        "std": x.std(0).tolist(),
        "q01": np.quantile(x, 0.01, axis=0).tolist(),
        "q99": np.quantile(x, 0.99, axis=0).tolist(),
    }


def norm_stats(demos: Demonstrations) -> dict:
    """openpi's `norm_stats.json` content for the robot's state (gripper position and closure) and
    actions (gripper motion and command)."""
    states = np.array([f.state for f in demos.frames], np.float64)
    actions = np.concatenate(demos.actions).astype(np.float64)
    return {"norm_stats": {"state": _stats(states), "actions": _stats(actions)}}


def normalizer(stats: dict) -> Normalizer:
    s = stats["norm_stats"]
    return Normalizer(Stats.from_dict(s["state"], "state"), Stats.from_dict(s["actions"], "actions"))


class BatchMaker:
    """Frames to `training.Batch`es: rendered cameras, the server's prompts, normalized chunks.

    The action prompt carries the frame's subtask, except in a `subtask_dropout` share of rows (none:
    the `off` subtask mode) and a `stale_subtask` share, where it is the subtask of up to
    `stale_ticks` ticks earlier: a robot in `refresh` mode acts on the last published subtask, which
    lags the phase, and must still do the right thing (close the gripper at the block while its
    subtask still says reach for it).

    In the text loss the token that names a place (the subtask's last, "... at 3") weighs
    `place_weight` times the others: it is the one token that needs the cameras, the others follow
    from the prompt and the gripper's state and are learnt in a few hundred steps, and at equal
    weight the place was still a guess between two places after 3300 steps."""

    def __init__(
        self,
        cfg: ModelConfig,
        frames: list[Frame],
        norm: Normalizer,
        tokenizer: Tokenizer,
        task: PickPlaceTask,
        *,
        subtask_dropout: float = 0.1,
        stale_subtask: float = 0.3,
        stale_ticks: int = 25,
        text_share: float = 0.25,
        place_weight: float = 1.0,
    ):
        self.cfg = cfg
        self.frames = list(frames)
        self.norm = norm
        self.prompts = Prompts(cfg, tokenizer)
        self.tokenizer = tokenizer
        self.subtask_dropout = subtask_dropout
        self.stale_subtask = stale_subtask
        self.stale_ticks = stale_ticks
        self.text_share = text_share
        self.place_weight = place_weight
        self._arm = SimArm(image_size=cfg.siglip.image_size, task=task)  # renders the stored frames

    def text(self, prompt: str, state: np.ndarray, subtask: str) -> tuple[np.ndarray, ...]:
        """The subtask stage's prompt then the subtask's tokens and EOS: tokens, mask, ar, loss weights."""
        prefix_text = self.prompts.subtask_text(prompt, state)
        prefix = self.tokenizer.encode(prefix_text, add_bos=True)
        full = self.tokenizer.encode(f"{prefix_text} {subtask}", add_bos=True)
        if full[: len(prefix)] != prefix:
            raise ValueError(f"the subtask {subtask!r} does not tokenize as a continuation of {prefix_text!r}")
        ids = [*full, self.tokenizer.eos_id]
        n, limit = len(ids), self.cfg.max_token_len
        if n > limit:
            raise ValueError(f"prompt and subtask are {n} tokens, more than max_token_len {limit}: {prefix_text!r}")
        tokens = np.zeros(limit, np.int32)
        tokens[:n] = ids
        positions = np.arange(limit)
        # Position i is scored on token i + 1: from the prompt's last token to the one before EOS.
        weights = ((positions >= len(prefix) - 1) & (positions < n - 1)).astype(np.float32)
        if subtask[-1:].isdigit():  # "... at 3": the place is the last token before EOS
            if self.tokenizer.decode([full[-1]]).strip() != subtask[-1]:
                raise ValueError(f"the place in {subtask!r} is not a token of its own")
            weights[n - 3] = self.place_weight
        return tokens, positions < n, positions >= len(prefix), weights

    def make(self, rng: np.random.Generator, batch_size: int):
        cfg = self.cfg
        keys = cfg.image_keys
        idx = rng.integers(len(self.frames), size=batch_size)
        drop = rng.random(batch_size) < self.subtask_dropout
        stale = rng.random(batch_size) < self.stale_subtask
        lags = np.where(stale, rng.integers(1, self.stale_ticks + 1, batch_size), 0)
        text_rows = max(1, round(batch_size * self.text_share))
        images = np.zeros((batch_size, len(keys), cfg.siglip.image_size, cfg.siglip.image_size, 3), np.uint8)
        fields: dict[str, list] = {k: [] for k in ("at", "am", "tt", "tm", "ar", "tl", "act")}
        for row, i in enumerate(idx):
            f = self.frames[i]
            arm = self._arm
            arm.q, arm.gripper, arm.scene = f.q, f.gripper, f.scene
            views = arm.render()
            for c, k in enumerate(keys):
                images[row, c] = views[k]
            state = self.norm.normalize_state(f.state)
            # Frames of an episode are consecutive: `tick` frames before this one is its first.
            subtask = None if drop[row] else self.frames[i - min(lags[row], f.tick)].subtask
            at, am = self.prompts.tokenize(self.prompts.action_text(f.prompt, state, subtask))
            if row < text_rows:
                for k, v in zip(("tt", "tm", "ar", "tl"), self.text(f.prompt, state, f.subtask), strict=True):
                    fields[k].append(v)
            chunk = self.norm.normalize_actions(f.chunk, cfg.action_dim)
            for k, v in zip(("at", "am", "act"), (at, am, chunk), strict=True):
                fields[k].append(v)
        return training.Batch(
            images=images,
            image_mask=np.ones((batch_size, len(keys)), bool),
            action_tokens=np.stack(fields["at"]),
            action_mask=np.stack(fields["am"]),
            text_tokens=np.stack(fields["tt"]),
            text_mask=np.stack(fields["tm"]),
            text_ar=np.stack(fields["ar"]),
            text_loss=np.stack(fields["tl"]),
            actions=np.stack(fields["act"]).astype(np.float32),
        )


class Progress:
    """A one-line progress bar on a stream: step, losses, speed and time left (speed counted from
    the first update, after the first step's compile)."""

    def __init__(self, total: int, out: TextIO = sys.stderr, clock: Callable[[], float] = time.monotonic):
        self.total = total
        self.out = out
        self.clock = clock
        self._first: tuple[int, float] | None = None

    def update(self, step: int, metrics: dict[str, float]) -> None:
        now = self.clock()
        if self._first is None:
            self._first = (step, now)
        first_step, first_time = self._first
        rate = (step - first_step) / (now - first_time) if now > first_time else 0.0
        left = (self.total - step) / rate if rate > 0 else float("nan")
        done = int(30 * step / self.total)
        bar = "#" * done + "." * (30 - done)
        losses = " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        self.out.write(f"\r[{bar}] {step}/{self.total} {losses} | {rate:.2f} steps/s | {_mmss(left)} left ")
        self.out.flush()

    def close(self) -> None:
        self.out.write("\n")
        self.out.flush()


def _mmss(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "--:--"
    return f"{int(seconds) // 60:02d}:{int(seconds) % 60:02d}"


def loss_chart(rows: list[dict[str, float]], title: str):
    steps = np.array([r["step"] for r in rows], float)
    series = []
    for key in ("loss", "flow", "text"):
        y = np.array([r[key] for r in rows], float)
        k = max(1, len(y) // 50)  # a moving average, so the trend shows through the batch noise
        smooth = np.convolve(y, np.ones(k) / k, mode="valid")
        series.append(plot.Series(key, steps[k - 1 :], smooth))
    return plot.line_chart(series, title, log_y=True)


@dataclasses.dataclass
class TrainResult:
    params: dict
    history: list[dict[str, float]]
    steps_per_s: float  # training steps only, not the rounds


# A round between two steps (DAgger): called with the step and the params so far.
Round = Callable[[int, dict], None]


def train(
    cfg: ModelConfig,
    batches: BatchMaker,
    steps: int,
    batch_size: int,
    seed: int,
    lr: float,
    warmup: int,
    text_weight: float,
    progress: Progress | None = None,
    rounds: dict[int, Round] | None = None,
) -> TrainResult:
    """AdamW on both losses for `steps` steps; `rounds[k]` runs before step k (and may add frames
    to `batches`: the batches made after it draw from them)."""
    rng = np.random.default_rng([seed, 1])
    params = params_lib.init_params(cfg, seed=seed, dtype=jnp.float32)
    opt = training.OptimizerSettings(lr, warmup, steps)
    opt_state = opt.build().init(params)
    key = jax.random.key(seed)
    history: list[dict[str, float]] = []
    batch = batches.make(rng, batch_size)
    pending = None
    started = None
    paused = 0.0
    for step in range(steps):
        if rounds and step in rounds:
            before = time.monotonic()
            rounds[step](step, params)
            paused += time.monotonic() - before
        params, opt_state, metrics = training.train_step(
            params, opt_state, batch, jax.random.fold_in(key, step), cfg, opt, text_weight
        )
        if step + 1 < steps:
            batch = batches.make(rng, batch_size)  # while the device runs this step
        if pending is not None:
            history.append(_row(*pending))
        pending = (step, metrics)
        if step == 0:
            jax.block_until_ready(metrics)
            started = time.monotonic()  # the first step compiles: speed counts from the second
        if progress is not None and history:
            progress.update(step, {k: history[-1][k] for k in ("loss", "flow", "text")})
    history.append(_row(*pending))
    elapsed = time.monotonic() - started - paused if started is not None else 0.0
    return TrainResult(params, history, (steps - 1) / elapsed if elapsed > 0 else 0.0)


def _row(step: int, metrics) -> dict[str, float]:
    return {"step": step, **{k: float(v) for k, v in metrics.items()}}


def save(out: Path, cfg: ModelConfig, params: dict, stats: dict) -> Path:
    save_params(out / "params", params)
    assets = out / "assets" / cfg.asset_id
    assets.mkdir(parents=True, exist_ok=True)
    (assets / "norm_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runtime.training", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory to write (must not hold params/)")
    p.add_argument("--config", default="pi05_demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--episodes", type=int, default=1000, help="expert demonstrations")
    p.add_argument("--steps", type=int, default=3300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=100, help="warmup steps")
    p.add_argument("--text-weight", type=float, default=1.0, help="weight of the subtask text loss")
    p.add_argument("--text-share", type=float, default=0.75, help="share of each batch's rows with the text loss")
    p.add_argument(
        "--place-weight", type=float, default=10.0, help="text-loss weight of the token naming a place (others: 1)"
    )
    p.add_argument("--subtask-dropout", type=float, default=0.1, help="share of action prompts without subtask")
    p.add_argument(
        "--stale-subtask", type=float, default=0.15, help="share of action prompts with a subtask up to 0.5 s old"
    )
    p.add_argument("--noise", type=float, default=0.3, help="target noise of the noisy demonstrations (x 10 cm)")
    p.add_argument(
        "--fumble", type=float, default=0.02, help="per-tick chance of a premature grasp in the noisy demonstrations"
    )
    p.add_argument(
        "--dagger-at",
        type=float,
        nargs="*",
        default=[0.45, 0.7],
        metavar="FRACTION",
        help="DAgger rounds, at these fractions of the steps (none: expert frames only)",
    )
    p.add_argument("--dagger-episodes", type=int, default=64, help="policy episodes per DAgger round")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"), type=str.upper)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.place_weight <= 0 or not 0 <= args.fumble <= 1:
        parser.error(f"--place-weight must be > 0 and --fumble in [0, 1], got {args.place_weight} and {args.fumble}")
    # force: JAX's import has already given the root logger a handler.
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)
    cfg = get_model_config(args.config)
    if cfg.asset_id is None:
        print(f"train_demo: error: config {cfg.name!r} has no asset id for its norm stats", file=sys.stderr)
        return 2
    if (args.out / "params").exists():
        print(f"train_demo: error: {args.out / 'params'} exists; choose another --out", file=sys.stderr)
        return 2
    task = PickPlaceTask()
    start = time.monotonic()
    demos = demonstrations(
        task, args.episodes, cfg.action_horizon, args.seed, cfg.siglip.image_size, args.noise, fumble=args.fumble
    )
    log.info(
        "%d demonstrations (%d successful), %d frames in %.1f s",
        demos.episodes,
        demos.successes,
        len(demos.frames),
        time.monotonic() - start,
    )
    stats = norm_stats(demos)
    norm = normalizer(stats)
    batches = BatchMaker(
        cfg,
        demos.frames,
        norm,
        load_tokenizer(cfg),
        task,
        subtask_dropout=args.subtask_dropout,
        stale_subtask=args.stale_subtask,
        text_share=args.text_share,
        place_weight=args.place_weight,
    )
    progress = Progress(args.steps)
    rounds_done: list[dict] = []

    def dagger(step: int, params: dict) -> None:
        began = time.monotonic()
        first = demos.episodes + len(rounds_done) * args.dagger_episodes  # scenes the expert never saw
        run = policy_episodes(params, cfg, norm, batches.prompts, task, args.dagger_episodes, args.seed, first)
        batches.frames += run.frames
        rounds_done.append(
            {"step": step, "episodes": run.episodes, "successes": run.successes, "frames": len(run.frames)}
        )
        progress.out.write("\n")
        log.info(
            "DAgger at step %d: the policy succeeded in %d of %d episodes; %d frames labelled by the expert (%.0f s)",
            step, run.successes, run.episodes, len(run.frames), time.monotonic() - began,
        )  # fmt: skip

    rounds = {round(f * args.steps): dagger for f in args.dagger_at if 0 < f < 1}
    result = train(
        cfg, batches, args.steps, args.batch_size, args.seed, args.lr, args.warmup, args.text_weight, progress, rounds
    )
    progress.close()
    out = save(args.out, cfg, result.params, stats)
    with (out / "loss.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(result.history[0]))
        writer.writeheader()
        writer.writerows(result.history)
    plot.save(loss_chart(result.history, f"{cfg.name}: training loss (seed {args.seed})"), out / "loss.png")
    summary = {
        "config": cfg.name,
        **{k: v for k, v in vars(args).items() if k not in ("out", "log_level", "config")},
        "frames": len(demos.frames),
        "dagger": rounds_done,
        "steps_per_s": result.steps_per_s,
        "wall_s": time.monotonic() - start,
        "final": result.history[-1],
    }
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("wrote %s (%.2f steps/s); serve it with: python -m runtime.policy_server --config %s --checkpoint %s",
             out, result.steps_per_s, cfg.name, out)  # fmt: skip
    return 0
