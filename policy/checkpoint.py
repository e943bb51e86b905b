"""Reading and writing parameters in the layout of an openpi checkpoint's `params/` folder.

The format is stated, never guessed: an orbax PyTree checkpoint whose single item is
`{"params": <openpi's tree>}`, leaves optionally ending in a `value` key (openpi training
checkpoints). The tree is checked against `params.param_shapes` from the metadata alone, before a
byte of weights is read, and the first missing, unexpected or mis-shaped path is named.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

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
        f"(with _METADATA and manifest.ocdbt) or in {path} itself"
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
    raw = dict(flatten(_to_dict(tree["params"])))
    has_value = bool(raw) and all(p.endswith("/value") for p in raw)
    shapes = {p.removesuffix("/value") if has_value else p: tuple(m.shape) for p, m in raw.items()}
    return shapes, has_value


def _to_dict(tree):
    if hasattr(tree, "items"):
        return {k: _to_dict(v) for k, v in tree.items()}
    return tree


def check_tree(stored: dict[str, tuple[int, ...]], cfg: ModelConfig, source: str) -> None:
    """Raises `CheckpointError` naming the first path that does not fit, with both shapes."""
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
        if tuple(stored[path]) != tuple(expected[path]):
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
