"""Times the model's phases: prefill (SigLIP + VLM into the KV cache) and action sampling.

Random weights at the named configuration; inputs already on the device; each phase timed with
the device synchronised, after warm-up, median of many runs. The baseline in the same run is
the whole `sample_actions` compiled as one function (openpi's way); the ratio shows what the
split costs or saves.
"""

from __future__ import annotations

import argparse
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.report import percentiles_ms, write_section
from configs import get_model_config
from policy.model import pi05
from policy.model.params import init_params

log = logging.getLogger("bench.model_latency")


def _time(fn, iters: int) -> list[float]:
    jax.block_until_ready(fn())  # warm-up: compile outside the clock
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        samples.append(time.perf_counter() - start)
    return samples


def run(config: str, batches: list[int], iters: int) -> str:
    cfg = get_model_config(config)
    params = init_params(cfg, dtype=jnp.dtype(cfg.dtype))
    rows = []
    for b in batches:
        rng = np.random.default_rng(0)
        c = len(cfg.image_keys)
        obs = jax.device_put(
            pi05.Observation(
                images=rng.uniform(-1, 1, (b, c, 224, 224, 3)).astype(np.float32),
                image_mask=np.ones((b, c), bool),
                tokens=rng.integers(3, cfg.vocab_size, (b, cfg.max_token_len)).astype(np.int32),
                token_mask=np.ones((b, cfg.max_token_len), bool),
            )
        )
        noise = jax.device_put(rng.standard_normal((b, cfg.action_horizon, cfg.action_dim)).astype(np.float32))
        steps = jnp.int32(cfg.num_steps)
        prefix = pi05.prefill_jit(params, obs, cfg)
        t_prefill = _time(lambda obs=obs: pi05.prefill_jit(params, obs, cfg), iters)
        t_denoise = _time(
            lambda prefix=prefix, noise=noise, steps=steps: pi05.denoise_jit(params, prefix, noise, steps, cfg), iters
        )
        t_full = _time(
            lambda obs=obs, noise=noise, steps=steps: pi05.sample_actions_jit(params, obs, noise, steps, cfg), iters
        )
        (pp, _), (dp, _), (fp, f99) = (
            percentiles_ms(t_prefill),
            percentiles_ms(t_denoise),
            percentiles_ms(t_full),
        )
        rows.append(f"| {b} | {pp:.2f} | {dp:.2f} | {pp + dp:.2f} | {fp:.2f} | {f99:.2f} | {(pp + dp) / fp:.2f} |")
        log.info(
            "batch %d: prefill %.2f ms, %d flow steps %.2f ms, one-jit sample_actions %.2f ms",
            b,
            pp,
            cfg.num_steps,
            dp,
            fp,
        )
    body = (
        f"Config `{config}` ({cfg.dtype}), random weights, {len(cfg.image_keys)} cameras, "
        f"{cfg.max_token_len}-token prompt, {cfg.num_steps} flow steps, {iters} timed runs per cell (median).\n\n"
        "| batch | prefill ms | flow steps ms | prefill + steps ms | baseline: one-jit sample_actions ms (p50) | "
        "baseline p99 | split / baseline |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    if jax.default_backend() == "cpu":
        body += "\nCPU timings: only the ratios mean something here; absolute times mean something only on a GPU.\n"
    command = f"python -m bench.model_latency --config {config} --batch {' '.join(map(str, batches))} --iters {iters}"
    return write_section(f"model_latency_{config}", f"Model latency: {config}", body, command)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="pi05_tiny")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    print(run(args.config, args.batch, args.iters))


if __name__ == "__main__":
    main()
