"""The parity-fixture format: `config.json`, `params/`, `inputs.npz` and optionally `expected.npz`.

openpi's fixture generator writes this layout; `policy.replay` runs any folder in it, so a user can
run a checkpoint on saved inputs without a server.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from configs.model_config import GemmaConfig, ModelConfig, SiglipConfig
from policy.model.pi05 import Observation


def _gemma(d: dict) -> GemmaConfig:
    return GemmaConfig(**{k: d[k] for k in ("width", "depth", "mlp_dim", "num_heads", "num_kv_heads", "head_dim")})


def config_from_json(path: str | Path) -> ModelConfig:
    """A `ModelConfig` from a fixture's `config.json` (every dimension is written there)."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
        s = d["siglip"]
        if s["image_size"][0] != s["image_size"][1] or s["patch_size"][0] != s["patch_size"][1]:
            raise ValueError(f"only square images and patches are supported, got {s['image_size']}, {s['patch_size']}")
        pi0 = d.get("pi0_config", {})
        return ModelConfig(
            name=f"fixture:{path.parent.name}",
            vlm=_gemma(d["vlm"]),
            expert=_gemma(d["action_expert"]),
            siglip=SiglipConfig(
                width=s["width"],
                depth=s["depth"],
                mlp_dim=s["mlp_dim"],
                num_heads=s["num_heads"],
                patch_size=s["patch_size"][0],
                image_size=s["image_size"][0],
            ),
            vocab_size=d["vlm"]["vocab_size"],
            action_dim=pi0.get("action_dim", 32),
            action_horizon=pi0.get("action_horizon", 50),
            max_token_len=pi0.get("max_token_len", 200),
            discrete_state_input=pi0.get("discrete_state_input", True),
            image_keys=tuple(d["image_keys"]),
            dtype=d.get("compute_dtype", "float32"),
            num_steps=d.get("num_steps", 10),
        )
    except FileNotFoundError:
        raise FileNotFoundError(f"fixture config not found: {path}") from None
    except KeyError as e:
        raise ValueError(f"{path}: missing field {e.args[0]!r}") from None


def decode_steps(path: str | Path, default: int = 8) -> int:
    """How many greedy tokens the fixture's reference decoded (`decode_steps` in config.json)."""
    return int(json.loads(Path(path).read_text()).get("decode_steps", default))


def load_inputs(path: str | Path, cfg: ModelConfig) -> tuple[Observation, np.ndarray, int]:
    """The observation, noise and number of flow steps stored in `inputs.npz`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"fixture inputs not found: {path}")
    with np.load(path) as f:
        missing = [f"image_{k}" for k in cfg.image_keys if f"image_{k}" not in f]
        missing += [k for k in ("tokenized_prompt", "tokenized_prompt_mask", "noise") if k not in f]
        if missing:
            raise ValueError(f"{path}: missing arrays {missing}")
        batch = f["tokenized_prompt"].shape[0]
        images = np.stack([f[f"image_{k}"] for k in cfg.image_keys], axis=1).astype(np.float32)
        masks = np.stack(
            [f[f"image_mask_{k}"] if f"image_mask_{k}" in f else np.ones(batch, bool) for k in cfg.image_keys],
            axis=1,
        )
        obs = Observation(
            images=images,
            image_mask=masks.astype(bool),
            tokens=f["tokenized_prompt"].astype(np.int32),
            token_mask=f["tokenized_prompt_mask"].astype(bool),
        )
        num_steps = int(f["num_steps"]) if "num_steps" in f else cfg.num_steps
        return obs, f["noise"].astype(np.float32), num_steps
