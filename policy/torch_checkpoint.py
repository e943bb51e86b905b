"""Pi0.5 weights in PyTorch's layout (`model.safetensors`), read without torch.

LeRobot's `PI05Policy.save_pretrained` and openpi's JAX-to-PyTorch conversion both write one
safetensors file of the `torch_names` tensors. Its header (names, dtypes, shapes) is checked
against the model config before a byte of weights is read: the first missing, unexpected or
mis-shaped tensor is named with both shapes, in one line. The tensors are then read one leaf of
openpi's tree at a time through `safetensors`' numpy API (bfloat16 as ml_dtypes' type, which JAX
shares), mixed float32 and bfloat16 as released checkpoints are, cast to the serving dtype.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open

from configs.model_config import ModelConfig
from policy import torch_names
from policy.checkpoint import CheckpointError
from policy.model.params import Params

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
# The dtypes a weight may be stored in; each is cast to the serving dtype on reading.
FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One tensor of a safetensors header."""

    dtype: str
    shape: tuple[int, ...]


def read_header(path: Path) -> dict[str, Tensor]:
    """Name -> dtype and shape from the file's header alone (no tensor is read)."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            return {
                name: Tensor(f.get_slice(name).get_dtype(), tuple(f.get_slice(name).get_shape())) for name in f.keys()
            }
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a safetensors file: {e}") from None


def check_header(header: dict[str, Tensor], cfg: ModelConfig, source: str, expects: str) -> str:
    """Raises `CheckpointError` naming the first tensor that does not fit `cfg` (missing,
    unexpected, mis-shaped with both shapes, or not a float); returns the names' prefix. `expects`
    says where the expected shapes come from (a config.json's fields), for the message."""
    prefix = torch_names.strip_prefix(header)
    stored = {name.removeprefix(prefix): t for name, t in header.items()}
    expected = torch_names.torch_shapes(cfg)
    embedding = torch_names.TIED_EMBEDDING
    if embedding not in stored and torch_names.EMBEDDING in stored:  # the tied embedding under its other name
        stored[embedding] = stored.pop(torch_names.EMBEDDING)
    optional = {torch_names.EMBEDDING: expected[embedding], torch_names.UNUSED: torch_names.unused_shape(cfg)}
    for name in sorted(set(expected) | set(stored)):
        want = expected.get(name, optional.get(name))
        if name not in stored:
            raise CheckpointError(f"{source}: missing tensor {prefix}{name} ({expects} expects shape {want})")
        have = stored[name]
        if want is None:
            raise CheckpointError(
                f"{source}: unexpected tensor {prefix}{name} with shape {have.shape} (not part of a Pi0.5 of {expects})"
            )
        if have.shape != tuple(want):
            raise CheckpointError(
                f"{source}: tensor {prefix}{name} has shape {have.shape} in the checkpoint, "
                f"{expects} expects {tuple(want)}"
            )
        if have.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{source}: tensor {prefix}{name} is {have.dtype}, not a float ({FLOAT_DTYPES})")
    return prefix


def load_params(
    path: Path, cfg: ModelConfig, dtype=jnp.bfloat16, device: jax.Device | None = None, *, expects: str = "the config"
) -> Params:
    """openpi's tree of `cfg` from `path` (checked first), cast to `dtype`, on `device`."""
    header = read_header(path)
    prefix = check_header(header, cfg, str(path), expects)
    names = {n.removeprefix(prefix) for n in header}
    embedding = torch_names.TIED_EMBEDDING if torch_names.TIED_EMBEDDING in names else torch_names.EMBEDDING
    device = device or jax.devices()[0]
    dtype = jnp.dtype(dtype)
    total = sum(math.prod(t.shape) for n, t in header.items() if not n.endswith(torch_names.UNUSED))
    done = 0
    start = time.perf_counter()

    def place(leaf: str, value: np.ndarray) -> jax.Array:
        nonlocal done
        done += value.size
        log.debug("loading %s: %s %.0f%%", path, leaf, 100 * done / total)
        return jax.device_put(value, device)

    with safe_open(str(path), framework="numpy") as f:

        def read(name: str) -> np.ndarray:
            return f.get_tensor(prefix + (embedding if name == torch_names.TIED_EMBEDDING else name))

        params = torch_names.to_params(read, cfg, dtype, place)
    log.info(
        "loaded %s (%.2f GB as %s) in %.1f s", path, total * dtype.itemsize / 1e9, dtype, time.perf_counter() - start
    )
    return params
