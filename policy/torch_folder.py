"""A checkpoint folder in PyTorch's layout: what it serves, checked before its weights are read.

Two writers make such folders, told apart by their `config.json`:
- LeRobot's `PI05Policy.save_pretrained` (`"type": "pi05"`): the model config is the file's
  (`lerobot_config`), the normalization its saved processors' (`lerobot_normalizer`), and its
  input features name the cameras;
- openpi's JAX-to-PyTorch conversion (variants, action dim and horizon): the config served is the
  one asked for, which the file must not contradict, and the norm stats are in `assets/<asset id>/`
  as in openpi's JAX checkpoints.

`describe` reads only small files (and the weights' safetensors header, or a header fetched apart
from the weights): a folder of another model, a config that contradicts the weights or missing
normalization files are refused in one line before a weight is read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import jax

from configs.model_config import ModelConfig
from policy import torch_checkpoint
from policy.checkpoint import CheckpointError
from policy.lerobot_config import CONFIG, check_openpi_conversion, is_lerobot, read_json, read_lerobot
from policy.lerobot_normalizer import read_normalizer
from policy.model.params import Params
from policy.normalize import Normalizer, checkpoint_normalizer

Writer = Literal["lerobot", "openpi"]


@dataclasses.dataclass(frozen=True)
class TorchFolder:
    """A described PyTorch-layout checkpoint: its folder, who wrote it, the config its weights were
    checked against, its own normalization (None: the norm stats come from elsewhere) and the
    cameras' other names (LeRobot feature name and short name -> model camera key)."""

    path: Path
    writer: Writer
    cfg: ModelConfig
    normalizer: Normalizer | None
    camera_aliases: Mapping[str, str]
    expects: str
    """Where the expected shapes come from, for the errors."""

    def load_params(self, dtype, device: jax.Device | None = None) -> Params:
        return torch_checkpoint.load_params(
            self.path / torch_checkpoint.WEIGHTS, self.cfg, dtype, device, expects=self.expects
        )


def is_torch_folder(path: Path) -> bool:
    """A folder with the weights or the config of PyTorch's layout (not orbax's `params/`)."""
    return (path / torch_checkpoint.WEIGHTS).is_file() or ((path / CONFIG).is_file() and not (path / "params").exists())


def describe(
    path: Path,
    cfg: ModelConfig,
    *,
    own_norm_stats: bool,
    source: str | None = None,
    header: dict[str, torch_checkpoint.Tensor] | None = None,
) -> TorchFolder:
    """The folder's writer, config and normalization, its weights' header checked against the
    config. `cfg` is the config asked for (LeRobot's folders bring their own); `source` names the
    checkpoint in errors (default: the path); `header` stands in for a weights file not yet fetched."""
    source = source or str(path)
    config = read_json(path / CONFIG, source)
    normalizer = None
    if is_lerobot(config):
        policy = read_lerobot(config, source)
        served, writer, aliases, expects = policy.cfg, "lerobot", policy.camera_aliases, "config.json"
        if not own_norm_stats:
            normalizer = read_normalizer(path, policy, source)
    else:
        check_openpi_conversion(config, cfg, source)
        served, writer, aliases, expects = cfg, "openpi", {}, f"config {cfg.name!r}"
        if not own_norm_stats:
            try:
                normalizer = checkpoint_normalizer(cfg, path / "assets")
            except FileNotFoundError as e:
                raise CheckpointError(f"{source}: {e}") from None
    if header is None:
        weights = path / torch_checkpoint.WEIGHTS
        if not weights.is_file():
            raise CheckpointError(f"{source}: config.json without {torch_checkpoint.WEIGHTS} (the weights)")
        header = torch_checkpoint.read_header(weights)
    torch_checkpoint.check_header(header, served, source, expects)
    return TorchFolder(path, writer, served, normalizer, aliases, expects)
