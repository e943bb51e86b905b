"""The engine's files (checkpoint, tokenizer, norm stats), checked in the order that fails fastest.

Any of them may be a local path or a URL. What needs no network is checked first: a missing local
path is reported before anything is fetched, so a typo in `--checkpoint` never waits behind a
download of the tokenizer. Then a remote checkpoint's metadata (orbax's `params/_METADATA`, tens of
KB, and the list of its `assets/`) is held against the config, so that a checkpoint of another
model is refused, naming the config it is, before gigabytes of weights arrive. Only then is
anything downloaded: the tokenizer (small) first, then the checkpoint, then separate norm stats.

A checkpoint in PyTorch's layout (LeRobot's or openpi's conversion, `torch_folder`), local or on
the Hugging Face hub (`hf://`, `hub`), is checked the same way: its configs, normalization files
and weights' header first (for `hf://`, fetched alone into huggingface_hub's cache), its weights
after the tokenizer. A LeRobot checkpoint brings its own model config, which the engine serves.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from configs.model_config import ModelConfig
from policy import checkpoint, download, hub, torch_checkpoint, torch_folder
from policy.engine.settings import EngineSettings
from policy.tokenizer import tokenizer_location


@dataclasses.dataclass(frozen=True)
class ModelFiles:
    """Local paths, every one there: the checkpoint (None: random weights), the tokenizer, and the
    norm stats given apart from the checkpoint (None: the checkpoint's own, or none); a checkpoint
    in PyTorch's layout is described in `torch` (None: openpi's orbax layout, or none)."""

    checkpoint: Path | None
    tokenizer: Path
    norm_stats: Path | None
    torch: torch_folder.TorchFolder | None = None


def fetch_model_files(cfg: ModelConfig, settings: EngineSettings) -> ModelFiles:
    """Checks every location, then fetches the remote ones into the download cache.

    Raises `CheckpointError` (not there, or not a checkpoint of `cfg`), `FileNotFoundError` (a
    missing tokenizer or norm stats) or `download.DownloadError` (unreachable), each one line."""
    own_stats = settings.norm_stats is not None
    location = settings.checkpoint_dir
    on_hub = location is not None and hub.is_hub(location)
    local_ckpt = download.local_copy(location) if location is not None and not on_hub else None
    torch = None
    if local_ckpt is not None and torch_folder.is_torch_folder(local_ckpt):
        torch = torch_folder.describe(local_ckpt, cfg, own_norm_stats=own_stats)
    elif local_ckpt is not None:
        checkpoint.local_fit(local_ckpt, cfg, own_norm_stats=own_stats)
    for what, path in (("tokenizer", settings.tokenizer_path), ("norm stats", settings.norm_stats)):
        if path is not None and not download.is_url(path) and not Path(path).expanduser().exists():
            raise FileNotFoundError(f"{what} not found: {path} does not exist")
    if on_hub:
        torch = _hub_fit(location, cfg, own_norm_stats=own_stats)
    elif location is not None and local_ckpt is None:
        _remote_fit(os.fspath(location).rstrip("/"), cfg, own_norm_stats=own_stats)
    tokenizer = tokenizer_location(torch.cfg if torch else cfg, settings.tokenizer_path, fetch=True)
    tokenizer_file = download.maybe_download(tokenizer, pass_as="--tokenizer")
    # The checkpoint before norm stats: stats given as a URL inside it (`.../assets/droid`) are
    # then read from its cache entry, and their own entry cannot make the checkpoint look fetched.
    ckpt = hub.snapshot(location, weights=True) if on_hub else local_ckpt or _fetch(location, "--checkpoint")
    return ModelFiles(ckpt, tokenizer_file, _fetch(settings.norm_stats, "--norm-stats"), torch)


def _hub_fit(location: str | Path, cfg: ModelConfig, *, own_norm_stats: bool) -> torch_folder.TorchFolder:
    """A hub checkpoint described from its small files and its weights' header (from the cache, or
    read from the hub apart from the weights)."""
    small = hub.snapshot(location, weights=False)
    weights = small / torch_checkpoint.WEIGHTS
    header = None if weights.is_file() else hub.weights_header(location)
    return torch_folder.describe(small, cfg, own_norm_stats=own_norm_stats, source=str(location), header=header)


def _fetch(location: str | Path | None, pass_as: str) -> Path | None:
    return None if location is None else download.maybe_download(location, pass_as=pass_as)


def _remote_fit(url: str, cfg: ModelConfig, *, own_norm_stats: bool) -> None:
    """`checkpoint.check_fit` from the remote checkpoint's metadata and asset listing alone."""
    try:
        metadata = download.read_small(f"{url}/params/_METADATA", url, "--checkpoint")
    except FileNotFoundError:
        raise checkpoint.CheckpointError(
            f"{url} is not an openpi checkpoint: it has no params/_METADATA (an orbax PyTree checkpoint in params/)"
        ) from None
    shapes = checkpoint.parse_metadata(metadata)
    if any(shape is None for shape in shapes.values()):  # an older orbax: the shapes are elsewhere
        try:
            extra = download.read_small(f"{url}/params/array_metadatas/process_0", url, "--checkpoint")
            shapes = checkpoint.parse_metadata(metadata, extra)
        except FileNotFoundError:
            pass  # the tree's paths are still checked
    assets = checkpoint.asset_ids(download.list_files(f"{url}/assets", url, "--checkpoint"))
    checkpoint.check_fit(shapes, assets, cfg, url, own_norm_stats=own_norm_stats)
