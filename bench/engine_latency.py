"""Per batch bucket: subtask decoding ms/token, subtask total and action ms, as the engine runs them.

Times the engine's two compiled phases with random weights at the named configuration, inputs
already on the device, the device synchronised, after warm-up, median of `--iters` runs. The
baseline in the same run is batch 1: the ratio column is per-robot cost relative to serving one
robot at a time.
"""

from __future__ import annotations

import argparse
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.report import write_section
from configs import get_model_config
from policy import phases, pi05
from policy.params import init_params

log = logging.getLogger("bench.engine_latency")


def _median_ms(*fns, iters: int) -> list[float]:
    """Median ms of each function, their runs interleaved so that machine noise hits all alike."""
    for fn in fns:
        jax.block_until_ready(fn())
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(iters):
        for fn, out in zip(fns, samples, strict=True):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            out.append(time.perf_counter() - start)
    return [float(np.median(s) * 1e3) for s in samples]


def _observation(cfg, b: int) -> pi05.Observation:
    rng = np.random.default_rng(b)
    c = len(cfg.image_keys)
    return jax.device_put(
        pi05.Observation(
            images=rng.uniform(-1, 1, (b, c, 224, 224, 3)).astype(np.float32),
            image_mask=np.ones((b, c), bool),
            tokens=rng.integers(3, cfg.vocab_size, (b, cfg.max_token_len)).astype(np.int32),
            token_mask=np.ones((b, cfg.max_token_len), bool),
        )
    )


def _measure(params: dict, cfg, b: int, steps: int, iters: int) -> dict[str, float]:
    obs = _observation(cfg, b)
    seeds = jnp.arange(b, dtype=jnp.uint32)
    limits = jnp.full((b,), steps, jnp.int32)
    greedy = jnp.zeros((b,), jnp.float32)
    _, lengths = phases.subtask_phase(params, obs, seeds, limits, greedy, cfg, steps)
    decoded = int(np.max(np.asarray(lengths)))  # the loop runs until the longest row stops
    one = jnp.ones((b,), jnp.int32)
    # The same executable with a budget of one token (prefill + first token) and of `steps`: the
    # difference is the cost of the decoding loop alone.
    subtask, first_token, action = _median_ms(
        lambda: phases.subtask_phase(params, obs, seeds, limits, greedy, cfg, steps),
        lambda: phases.subtask_phase(params, obs, seeds, one, greedy, cfg, steps),
        lambda: phases.action_phase(params, obs, seeds, jnp.int32(cfg.num_steps), cfg),
        iters=iters,
    )
    per_token = (subtask - first_token) / max(decoded - 1, 1)
    return dict(decoded=decoded, prefill=first_token, per_token=per_token, subtask=subtask, action=action)


def run(config: str, batches: list[int], steps: int, iters: int) -> str:
    cfg = get_model_config(config)
    params = init_params(cfg, dtype=jnp.dtype(cfg.dtype))
    rows, base = [], None
    for b in batches:
        m = _measure(params, cfg, b, steps, iters)
        both = m["subtask"] + m["action"]
        base = base or both / b
        rows.append(
            f"| {b} | {m['decoded']} | {m['prefill']:.2f} | {m['per_token']:.3f} | {m['subtask']:.2f} | "
            f"{m['action']:.2f} | {both:.2f} | {both / b / base:.2f} |"
        )
        log.info(
            "batch %d: subtask %.2f ms (%.3f ms/token), actions %.2f ms", b, m["subtask"], m["per_token"], m["action"]
        )
    body = (
        f"Config `{config}` ({cfg.dtype}), random weights, {len(cfg.image_keys)} cameras, "
        f"{cfg.max_token_len}-token prompt, {cfg.num_steps} flow steps, greedy decoding budget {steps}, "
        f"{iters} timed runs per cell (median).\n\n"
        "| batch | tokens decoded | prefill + first token ms | subtask ms/token | subtask total ms | action ms | "
        "both ms | per-robot cost vs batch 1 |\n|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    if jax.default_backend() == "cpu":
        body += "\nCPU timings: only the ratios mean something here; absolute times mean something only on a GPU.\n"
    command = (
        f"python -m bench.engine_latency --config {config} --batch {' '.join(map(str, batches))} "
        f"--steps {steps} --iters {iters}"
    )
    return write_section(f"engine_latency_{config}", f"Engine latency: {config}", body, command)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="pi05_tiny")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=25, help="subtask decoding budget")
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    print(run(args.config, args.batch, args.steps, args.iters))


if __name__ == "__main__":
    main()
