"""Run a checkpoint offline on saved inputs: `python -m policy.replay FIXTURE_DIR --out OUT.npz`.

Reads a folder in the parity-fixture format (see `policy.fixture`), computes the actions, writes
them to OUT.npz and, when the folder has an `expected.npz`, prints the max abs error against it.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from policy import checkpoint, fixture
from policy.engine import phases
from policy.model import pi05

log = logging.getLogger("policy.replay")


def replay(folder: Path, dtype: str, decode_steps: int | None = None) -> dict[str, np.ndarray]:
    cfg = fixture.config_from_json(folder / "config.json").replace(dtype=dtype)
    decode_steps = decode_steps or fixture.decode_steps(folder / "config.json")
    params = checkpoint.load_params(folder / "params", cfg, dtype=jnp.dtype(dtype))
    obs, noise, num_steps = fixture.load_inputs(folder / "inputs.npz", cfg)
    start = time.perf_counter()
    actions = np.asarray(pi05.sample_actions_jit(params, obs, noise, jnp.int32(num_steps), cfg))
    log.info("sampled actions %s in %.2f s (compile included)", actions.shape, time.perf_counter() - start)
    b = actions.shape[0]
    greedy = jnp.zeros((b,), jnp.float32)
    tokens, _ = phases.subtask_phase(
        params, obs, jnp.zeros((b,), jnp.uint32), jnp.full((b,), decode_steps, jnp.int32), greedy, cfg, decode_steps
    )
    return {"actions": actions, "decode_tokens": np.asarray(tokens)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m policy.replay", description=__doc__.splitlines()[0])
    parser.add_argument("fixture", type=Path, help="folder with config.json, params/, inputs.npz")
    parser.add_argument("--out", type=Path, required=True, help="where to write the computed arrays (.npz)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="params and compute dtype")
    parser.add_argument("--decode-steps", type=int, default=None, help="greedy decode length (default: the fixture's)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        result = replay(args.fixture, args.dtype, args.decode_steps)
    except (FileNotFoundError, ValueError) as e:
        log.error("%s", e)
        return 2
    np.savez(args.out, **result)
    out = sys.stdout
    out.write(f"wrote {', '.join(f'{k} {v.shape}' for k, v in result.items())} to {args.out}\n")
    expected_path = args.fixture / "expected.npz"
    if expected_path.exists():
        with np.load(expected_path) as expected:
            key = "actions_bf16" if args.dtype == "bfloat16" and "actions_bf16" in expected else "actions"
            if key in expected:
                err = float(np.abs(result["actions"] - expected[key]).max())
                out.write(f"max abs error vs expected {key}: {err:.3e}\n")
            if "decode_tokens" in expected and expected["decode_tokens"].shape == result["decode_tokens"].shape:
                same = bool((expected["decode_tokens"] == result["decode_tokens"]).all())
                out.write(f"greedy decode tokens match expected: {same}\n")
    out.write(f"backend: {jax.default_backend()}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
