"""Reading and writing parameters in the layout of an openpi checkpoint's `params/` folder.

The format is stated, never guessed: an orbax PyTree checkpoint whose single item is
`{"params": <openpi's tree>}`, leaves optionally ending in a `value` key (openpi training
checkpoints). The tree is checked against `params.param_shapes` from the metadata alone, before a
byte of weights is read, and the first missing, unexpected or mis-shaped path is named.

A checkpoint of another model is refused naming the registered config it fits (`check_fit`): the
tree and shapes narrow it to a size (pi05 or a tiny one), the asset ids of its `assets/` folder
(`droid`, `trossen`) to a robot. `parse_metadata` reads the tree from orbax's `_METADATA` JSON
itself, so that a remote checkpoint is checked from a few KB before its weights are fetched.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from configs import get_model_config, model_config_names
from configs.model_config import ModelConfig
from policy.model.params import Params, flatten, param_shapes

log = logging.getLogger(__name__)

# Leaves are restored in groups of about this many bytes so that progress can be logged.
_GROUP_BYTES = 1 << 30


class CheckpointError(ValueError):
    """The checkpoint is missing or does not fit the configuration."""


def _strip_value(tree):
    if isinstance(tree, dict):
        if set(tree) == {"value"} and not isinstance(tree["value"], dict):
            return tree["value"]
        return {k: _strip_value(v) for k, v in tree.items()}
    return tree


def _nested_get(tree: dict, path: str):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def _nested_set(tree: dict, path: str, value) -> None:
    *parents, leaf = path.split("/")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def params_dir(path: str | Path) -> Path:
    """Accepts either an openpi checkpoint directory or its `params/` folder; absolute, as orbax needs."""
    path = Path(path).expanduser().resolve()
    if (path / "params" / "_METADATA").exists() or (path / "params" / "_CHECKPOINT_METADATA").exists():
        return path / "params"
    if (path / "_METADATA").exists() or (path / "_CHECKPOINT_METADATA").exists():
        return path
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path} does not exist")
    raise CheckpointError(
        f"{path} is not an openpi checkpoint: expected an orbax PyTree checkpoint in {path / 'params'} "
        f"(with _METADATA and manifest.ocdbt) or in {path} itself, nor a PyTorch one (model.safetensors with its "
        "config.json, as LeRobot or openpi's conversion write them)"
    )


def assets_dir(path: str | Path) -> Path:
    """The checkpoint's `assets/` folder (norm stats by asset id), beside its `params/`."""
    return params_dir(path).parent / "assets"


def _stored_shapes(directory: Path) -> tuple[dict[str, tuple[int, ...]], bool]:
    """Path -> shape from the checkpoint metadata; also whether leaves carry a trailing `value`."""
    meta = ocp.PyTreeCheckpointer().metadata(directory)
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    tree = dict(tree)
    if set(tree) != {"params"}:
        raise CheckpointError(f"{directory}: expected a single item 'params', found {sorted(tree)}")
    return _tree_paths({p: tuple(m.shape) for p, m in flatten(_to_dict(tree["params"]))})


def _to_dict(tree):
    if hasattr(tree, "items"):
        return {k: _to_dict(v) for k, v in tree.items()}
    return tree


def parse_metadata(metadata: bytes, array_metadatas: bytes | None = None) -> dict[str, tuple[int, ...] | None]:
    """Path -> shape from the JSON of orbax's `params/_METADATA` (and, where it records no
    `write_shape`, as older orbax versions do not, from `params/array_metadatas/process_0`); a
    shape neither records is None. Paths as `check_tree` takes them, the `value` suffix removed."""
    source = "params/_METADATA"
    try:
        tree = json.loads(metadata)["tree_metadata"]
        raw = {
            "/".join(str(k["key"]) for k in leaf["key_metadata"]): leaf.get("value_metadata", {}).get("write_shape")
            for leaf in tree.values()
        }
        if array_metadatas is not None:
            source = "params/array_metadatas"
            for entry in json.loads(array_metadatas)["array_metadatas"]:
                entry = entry["array_metadata"]
                path = entry["param_name"].replace(".", "/")
                if raw.get(path) is None and path in raw:
                    raw[path] = entry.get("write_shape")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{source} is not orbax's metadata: {type(e).__name__}: {e}") from None
    if not raw or any(not p.startswith("params/") for p in raw):
        raise CheckpointError(
            f"{source}: expected a single item 'params', found {sorted({p.split('/')[0] for p in raw})}"
        )
    return _tree_paths({p.removeprefix("params/"): None if s is None else tuple(s) for p, s in raw.items()})[0]


def _tree_paths(raw: dict[str, tuple[int, ...] | None]) -> tuple[dict[str, tuple[int, ...] | None], bool]:
    """The paths without a trailing `value` when every leaf has one (openpi's training checkpoints),
    and whether they had it."""
    has_value = bool(raw) and all(p.endswith("/value") for p in raw)
    return {p.removesuffix("/value") if has_value else p: shape for p, shape in raw.items()}, has_value


def asset_ids(files: Iterable[str]) -> tuple[str, ...]:
    """The asset ids of a checkpoint's `assets/` folder, from its files' paths relative to it:
    every folder holding a `norm_stats.json` (`droid`, `physical-intelligence/libero`)."""
    return tuple(sorted(f.removesuffix("/norm_stats.json") for f in files if f.endswith("/norm_stats.json")))


def local_fit(path: str | Path, cfg: ModelConfig, *, own_norm_stats: bool) -> None:
    """`check_fit` for a local checkpoint, from its metadata and its `assets/` folder."""
    directory = params_dir(path)
    assets = directory.parent / "assets"
    files = [p.relative_to(assets).as_posix() for p in assets.rglob("*") if p.is_file()] if assets.is_dir() else []
    check_fit(_stored_shapes(directory)[0], asset_ids(files), cfg, str(directory.parent), own_norm_stats=own_norm_stats)


def check_fit(
    stored: dict[str, tuple[int, ...] | None],
    assets: tuple[str, ...],
    cfg: ModelConfig,
    source: str,
    *,
    own_norm_stats: bool,
) -> None:
    """Raises `CheckpointError`, one line naming the config the checkpoint is and the flag that
    serves it, when it is not one of `cfg`: another tree or shapes, or (unless the norm stats come
    from elsewhere, `own_norm_stats`) no norm stats for `cfg`'s asset id."""
    try:
        check_tree(stored, cfg, source)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; {_which(stored, assets)}") from None
    if cfg.asset_id is None or own_norm_stats or cfg.asset_id in assets:
        return
    raise CheckpointError(
        f"{source} holds no norm stats for config {cfg.name!r} (asset id {cfg.asset_id!r}; its assets/ holds "
        f"{list(assets) or 'none'}); {_which(stored, assets)}, or pass the robot's norm_stats.json (--norm-stats)"
    )


def _which(stored: dict[str, tuple[int, ...] | None], assets: tuple[str, ...]) -> str:
    """Which registered configs the checkpoint fits, narrowed by its asset ids, and the flag."""
    fits = []
    for name in model_config_names():
        try:
            check_tree(stored, get_model_config(name), "")
        except CheckpointError:
            continue
        fits.append(get_model_config(name))
    named = [c.name for c in fits if c.asset_id in assets] or [c.name for c in fits]
    if len(named) == 1:
        return f"it is a checkpoint of config {named[0]!r}: pass --config {named[0]}"
    if named:
        return f"it fits configs {', '.join(named)}: pass --config with the one it was trained as"
    return f"it fits no known config ({', '.join(model_config_names())})"


def check_tree(stored: dict[str, tuple[int, ...] | None], cfg: ModelConfig, source: str) -> None:
    """Raises `CheckpointError` naming the first path that does not fit, with both shapes (a shape
    None, unknown from the metadata, fits any)."""
    expected = dict(flatten(param_shapes(cfg)))
    for path in sorted(set(expected) | set(stored)):
        if path not in stored:
            raise CheckpointError(
                f"{source}: missing parameter {path} (config {cfg.name!r} expects shape {expected[path]})"
            )
        if path not in expected:
            raise CheckpointError(
                f"{source}: unexpected parameter {path} with shape {stored[path]} (not part of config {cfg.name!r})"
            )
        if stored[path] is not None and tuple(stored[path]) != tuple(expected[path]):
            raise CheckpointError(
                f"{source}: parameter {path} has shape {tuple(stored[path])} in the checkpoint, "
                f"config {cfg.name!r} expects {tuple(expected[path])}"
            )


def load_params(path: str | Path, cfg: ModelConfig, dtype=jnp.bfloat16, device: jax.Device | None = None) -> Params:
    """Restores an openpi `params/` folder into the model's tree, cast to `dtype`, on `device`."""
    directory = params_dir(path)
    stored, has_value = _stored_shapes(directory)
    check_tree(stored, cfg, str(directory))
    device = device or jax.devices()[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    dtype = jnp.dtype(dtype)
    total = sum(math.prod(s) for s in stored.values()) * dtype.itemsize
    checkpointer = ocp.PyTreeCheckpointer()
    out: dict = {}
    done = 0
    start = time.perf_counter()
    for group in _groups(stored, dtype.itemsize):
        item: dict = {}
        restore_args: dict = {}
        for p in group:
            leaf = f"params/{p}/value" if has_value else f"params/{p}"
            _nested_set(item, leaf, jax.ShapeDtypeStruct(stored[p], dtype, sharding=sharding))
            _nested_set(
                restore_args,
                leaf,
                ocp.ArrayRestoreArgs(sharding=sharding, dtype=dtype, restore_type=jax.Array),
            )
        restored = checkpointer.restore(
            directory, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
        )
        for p in group:
            _nested_set(out, p, _nested_get(restored, f"params/{p}/value" if has_value else f"params/{p}"))
        done += sum(math.prod(stored[p]) for p in group) * dtype.itemsize
        elapsed = time.perf_counter() - start
        log.info(
            "loading %s: %.0f%% (%.2f of %.2f GB, %.1f s)",
            directory,
            100 * done / total,
            done / 1e9,
            total / 1e9,
            elapsed,
        )
    return out


def _groups(stored: dict[str, tuple[int, ...]], itemsize: int) -> list[list[str]]:
    groups: list[list[str]] = [[]]
    size = 0
    for p in sorted(stored):
        nbytes = math.prod(stored[p]) * itemsize
        if groups[-1] and size + nbytes > _GROUP_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(p)
        size += nbytes
    return groups


def save_params(path: str | Path, params: Params) -> Path:
    """Writes `params` as openpi does: an orbax PyTree checkpoint holding `{"params": tree}`."""
    path = Path(path).expanduser().resolve()
    tree = {"params": jax.tree.map(np.asarray, params)}
    ocp.PyTreeCheckpointer().save(path, tree)
    return path
