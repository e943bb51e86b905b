"""openpi's `norm_stats.json` and the normalization of state and actions around the model.

pi05 uses quantile normalization, `(x - q01) / (q99 - q01 + 1e-6) * 2 - 1`; z-score with
`std + 1e-6` is the other mode. As in openpi, normalizing uses the first `x.shape[-1]` entries of the
stats, and unnormalizing leaves dims beyond the stats unchanged. The 1e-6 is openpi's; LeRobot's
processors save their own (1e-8), which a `Normalizer` carries as `eps`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal

import numpy as np

from configs.model_config import ModelConfig
from policy import download

Mode = Literal["quantile", "zscore"]
_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class Stats:
    mean: np.ndarray
    std: np.ndarray
    q01: np.ndarray
    q99: np.ndarray

    @classmethod
    def from_dict(cls, d: dict, where: str) -> Stats:
        fields = {}
        for name in ("mean", "std", "q01", "q99"):
            if name not in d:
                raise ValueError(f"{where}: missing {name!r}")
            fields[name] = np.asarray(d[name], np.float64)
        sizes = {k: v.shape for k, v in fields.items()}
        if len(set(sizes.values())) != 1 or len(fields["mean"].shape) != 1:
            raise ValueError(f"{where}: mean, std, q01 and q99 must be 1-D of one length, got {sizes}")
        return cls(**fields)

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])


@dataclasses.dataclass(frozen=True)
class Normalizer:
    """State in, actions out: the model's view of a robot's numbers."""

    state: Stats | None
    actions: Stats | None
    mode: Mode = "quantile"
    eps: float = _EPS
    """Added to the denominator (q99 - q01, or std): openpi's 1e-6, or the eps a LeRobot processor saved."""

    def normalize_state(self, state: np.ndarray) -> np.ndarray:
        return _normalize(state, self.state, self.mode, self.eps)

    def unnormalize_actions(self, actions: np.ndarray) -> np.ndarray:
        return _unnormalize(actions, self.actions, self.mode, self.eps)

    def normalize_actions(self, actions: np.ndarray, dim: int) -> np.ndarray:
        """Robot-unit actions (..., n) into model space (..., dim): the inverse of
        `unnormalize_actions` on the first n dims, the rest zero, as openpi pads actions after
        normalizing them (`PadStatesAndActions`). Real-time chunking guides toward these."""
        x = np.asarray(actions, np.float64)
        n = x.shape[-1]
        if n > dim:
            raise ValueError(f"actions have {n} dims, more than the model's {dim}")
        out = np.zeros((*x.shape[:-1], dim), np.float32)
        out[..., :n] = _normalize(x, self.actions, self.mode, self.eps)
        return out


IDENTITY = Normalizer(state=None, actions=None)


def _normalize(x: np.ndarray, s: Stats | None, mode: Mode, eps: float) -> np.ndarray:
    if s is None:
        return np.asarray(x, np.float32)
    n = x.shape[-1]
    if n > s.dim:
        raise ValueError(f"value has {n} dims, the norm stats only {s.dim}")
    if mode == "quantile":
        q01, q99 = s.q01[:n], s.q99[:n]
        out = (x - q01) / (q99 - q01 + eps) * 2.0 - 1.0
    else:
        out = (x - s.mean[:n]) / (s.std[:n] + eps)
    return out.astype(np.float32)


def _unnormalize(x: np.ndarray, s: Stats | None, mode: Mode, eps: float) -> np.ndarray:
    if s is None:
        return np.asarray(x, np.float32)
    n = min(x.shape[-1], s.dim)
    out = np.array(x, np.float64)
    head = out[..., :n]
    if mode == "quantile":
        q01, q99 = s.q01[:n], s.q99[:n]
        out[..., :n] = (head + 1.0) / 2.0 * (q99 - q01 + eps) + q01
    else:
        out[..., :n] = head * (s.std[:n] + eps) + s.mean[:n]
    return out.astype(np.float32)


def load_norm_stats(path: str | Path, mode: Mode = "quantile") -> Normalizer:
    """Reads openpi's `{"norm_stats": {"state": {...}, "actions": {...}}}`.

    `path` is the json file or an openpi checkpoint's `assets/<asset_id>/` folder, local or an
    fsspec URL (fetched into the download cache).
    """
    path = download.maybe_download(path, pass_as="--norm-stats")
    if path.is_dir():
        path = path / "norm_stats.json"
    if not path.is_file():
        raise FileNotFoundError(f"norm stats not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    stats = data.get("norm_stats", data) if isinstance(data, dict) else None
    if not isinstance(stats, dict):
        raise ValueError(f"{path}: expected an object with 'norm_stats'")
    state = Stats.from_dict(stats["state"], f"{path}: state") if "state" in stats else None
    actions = Stats.from_dict(stats["actions"], f"{path}: actions") if "actions" in stats else None
    return Normalizer(state=state, actions=actions, mode=mode)


def checkpoint_normalizer(cfg: ModelConfig, assets: Path, mode: Mode = "quantile") -> Normalizer:
    """The norm stats a checkpoint holds for `cfg`'s robot, as openpi's policy loader finds them:
    `assets/<asset_id>/norm_stats.json`. No stats (IDENTITY) only for a config without an asset id;
    a missing file is an error, because actions left in the model's [-1, 1] would move a robot."""
    if cfg.asset_id is None:
        return IDENTITY
    path = assets / cfg.asset_id / "norm_stats.json"
    if not path.is_file():
        found = sorted(str(p.parent.relative_to(assets)) for p in assets.rglob("norm_stats.json"))
        raise FileNotFoundError(
            f"norm stats not found: {path} (config {cfg.name!r} has asset id {cfg.asset_id!r}; the checkpoint's "
            f"assets hold {found or 'none'}). Pass the robot's norm_stats.json (--norm-stats)"
        )
    return load_norm_stats(path, mode)
