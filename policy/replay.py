"""Run a checkpoint offline on saved inputs: `python -m policy.replay INPUTS_DIR [--checkpoint CKPT] --out OUT.npz`.

Reads a folder in the parity-fixture format (see `policy.fixture`), computes the actions, writes
them to OUT.npz and, when the folder has an `expected.npz`, prints the max abs error against it.
Without `--checkpoint` the folder's own `config.json` and `params/` are the model; with it, any
checkpoint the server loads (an openpi folder, a LeRobot or openpi PyTorch folder, `hf://OWNER/REPO`)
runs on the folder's `inputs.npz`, with its own config (LeRobot's) or the folder's or `--config`'s.
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

from configs import get_model_config
from configs.model_config import ModelConfig
from policy import checkpoint, download, fixture, hub, torch_folder
from policy.engine import phases
from policy.model import pi05
from policy.model.params import Params

log = logging.getLogger("policy.replay")


def load_checkpoint(location: str, cfg: ModelConfig, dtype: str) -> tuple[ModelConfig, Params]:
    """The config and weights of any checkpoint the server loads (its normalization is not needed:
    the inputs are the model's). A LeRobot checkpoint brings its own config, `cfg` serves the rest."""
    if hub.is_hub(location):
        described = torch_folder.describe(
            hub.snapshot(location, weights=True), cfg, own_norm_stats=True, source=location
        )
    else:
        local = download.maybe_download(location, pass_as="--checkpoint")
        if not torch_folder.is_torch_folder(local):
            return cfg, checkpoint.load_params(local, cfg, dtype=jnp.dtype(dtype))
        described = torch_folder.describe(local, cfg, own_norm_stats=True)
    return described.cfg.replace(dtype=dtype), described.load_params(jnp.dtype(dtype))


def replay(
    folder: Path,
    dtype: str,
    decode_steps: int | None = None,
    checkpoint_location: str | None = None,
    config_name: str | None = None,
) -> dict[str, np.ndarray]:
    config = folder / "config.json"
    if config_name is not None or (checkpoint_location is not None and not config.is_file()):
        cfg = get_model_config(config_name or "pi05_tiny").replace(dtype=dtype)
    else:
        cfg = fixture.config_from_json(config).replace(dtype=dtype)
    decode_steps = decode_steps or (fixture.decode_steps(config) if config.is_file() else 8)
    if checkpoint_location is None:
        params = checkpoint.load_params(folder / "params", cfg, dtype=jnp.dtype(dtype))
    else:
        cfg, params = load_checkpoint(checkpoint_location, cfg, dtype)
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
    parser.add_argument(
        "fixture", type=Path, help="folder with inputs.npz (and config.json, params/ without --checkpoint)"
    )
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="checkpoint to run instead of the folder's params/: openpi or PyTorch (LeRobot) folder, URL or hf://OWNER/REPO",
    )
    parser.add_argument(
        "--config", default=None, help="model config of an openpi checkpoint (default: the folder's config.json)"
    )
    parser.add_argument("--out", type=Path, required=True, help="where to write the computed arrays (.npz)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="params and compute dtype")
    parser.add_argument("--decode-steps", type=int, default=None, help="greedy decode length (default: the fixture's)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        result = replay(args.fixture, args.dtype, args.decode_steps, args.checkpoint, args.config)
    except (FileNotFoundError, ValueError, download.DownloadError) as e:
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
