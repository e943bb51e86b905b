"""The one abstract description of the parameter tree, with openpi's paths and shapes.

Random init, checkpoint validation and `jax.eval_shape` checks all derive from `param_shapes`, so
the tree the model reads and the tree a checkpoint must hold cannot disagree.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from configs.model_config import GemmaConfig, ModelConfig, SiglipConfig

Params = dict  # nested dict of arrays, keyed exactly like openpi's `params` item


def _siglip_shapes(s: SiglipConfig, out_width: int) -> dict:
    d, n, h, layers = s.width, s.num_heads, s.head_dim, s.depth
    dense = lambda i, o: {"kernel": (layers, i, o), "bias": (layers, o)}  # noqa: E731
    return {
        "embedding": {"kernel": (s.patch_size, s.patch_size, 3, d), "bias": (d,)},
        "pos_embedding": (1, s.num_tokens, d),
        "Transformer": {
            "encoderblock": {
                "LayerNorm_0": {"scale": (layers, d), "bias": (layers, d)},
                "LayerNorm_1": {"scale": (layers, d), "bias": (layers, d)},
                "MultiHeadDotProductAttention_0": {
                    **{k: {"kernel": (layers, d, n, h), "bias": (layers, n, h)} for k in ("query", "key", "value")},
                    "out": {"kernel": (layers, n, h, d), "bias": (layers, d)},
                },
                "MlpBlock_0": {"Dense_0": dense(d, s.mlp_dim), "Dense_1": dense(s.mlp_dim, d)},
            },
            "encoder_norm": {"scale": (d,), "bias": (d,)},
        },
        "head": {"kernel": (d, out_width), "bias": (out_width,)},
    }


def _norm_shapes(g: GemmaConfig, adaptive: bool, layers: int | None) -> dict:
    lead = () if layers is None else (layers,)
    if adaptive:
        return {"Dense_0": {"kernel": (*lead, g.width, 3 * g.width), "bias": (*lead, 3 * g.width)}}
    return {"scale": (*lead, g.width)}


def _gemma_shapes(vlm: GemmaConfig, expert: GemmaConfig, vocab_size: int) -> dict:
    layers: dict = {"attn": {}}
    top: dict = {"embedder": {"input_embedding": (vocab_size, vlm.width)}, "layers": layers}
    for g, sfx, adaptive in ((vlm, "", False), (expert, "_1", True)):
        L = g.depth
        layers["attn"][f"q_einsum{sfx}"] = {"w": (L, g.num_heads, g.width, g.head_dim)}
        layers["attn"][f"kv_einsum{sfx}"] = {"w": (L, 2, g.num_kv_heads, g.width, g.head_dim)}
        layers["attn"][f"attn_vec_einsum{sfx}"] = {"w": (L, g.num_heads, g.head_dim, g.width)}
        layers[f"mlp{sfx}"] = {"gating_einsum": (L, 2, g.width, g.mlp_dim), "linear": (L, g.mlp_dim, g.width)}
        layers[f"pre_attention_norm{sfx}"] = _norm_shapes(g, adaptive, L)
        layers[f"pre_ffw_norm{sfx}"] = _norm_shapes(g, adaptive, L)
        top[f"final_norm{sfx}"] = _norm_shapes(g, adaptive, None)
    return top


def param_shapes(cfg: ModelConfig) -> dict:
    """openpi's pi05 parameter tree (leaves are shape tuples)."""
    w = cfg.expert.width
    dense = lambda i, o: {"kernel": (i, o), "bias": (o,)}  # noqa: E731
    return {
        "PaliGemma": {
            "img": _siglip_shapes(cfg.siglip, cfg.vlm.width),
            "llm": _gemma_shapes(cfg.vlm, cfg.expert, cfg.vocab_size),
        },
        "action_in_proj": dense(cfg.action_dim, w),
        "action_out_proj": dense(w, cfg.action_dim),
        "time_mlp_in": dense(w, w),
        "time_mlp_out": dense(w, w),
    }


def _is_shape(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def param_specs(cfg: ModelConfig, dtype=jnp.float32) -> dict:
    """The tree as `jax.ShapeDtypeStruct`s, for `eval_shape`, warm-up and checkpoint checks."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype), param_shapes(cfg), is_leaf=_is_shape)


def flatten(tree: dict, prefix: str = "") -> Iterator[tuple[str, object]]:
    """Yields (`a/b/c`, leaf) pairs in sorted path order, the way openpi names parameters."""
    for key in sorted(tree):
        value = tree[key]
        path = f"{prefix}/{key}" if prefix else key
        if isinstance(value, dict):
            yield from flatten(value, path)
        else:
            yield path, value


def count_params(tree: dict) -> int:
    return sum(math.prod(leaf.shape) for _, leaf in flatten(tree))


def init_params(cfg: ModelConfig, seed: int = 0, dtype=jnp.float32) -> Params:
    """Random weights of a plausible scale, for the embedded default and for benchmarks.

    Kernels get N(0, 1/fan_in) (fan_in: the contracted axes), LayerNorm scales 1 plus small noise,
    Gemma's norm scales (offsets from 1) and biases small noise rather than openpi's zeros, so every
    path of the network carries signal. One jitted function on the default device, so full-size
    random weights appear in seconds on a GPU.
    """
    return _init_jit(jax.random.key(seed), cfg, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def _init_jit(key: jax.Array, cfg: ModelConfig, dtype) -> Params:
    # One RNG op for the whole tree, sliced into leaves: compiling one RNG op per leaf costs
    # seconds on a CPU.
    leaves = list(flatten(param_shapes(cfg)))
    sizes = [math.prod(shape) for _, shape in leaves]
    flat = jax.random.normal(key, (sum(sizes),), jnp.float32)
    out: dict = {}
    offset = 0
    for (path, shape), size in zip(leaves, sizes, strict=True):
        normal = flat[offset : offset + size].reshape(shape)
        offset += size
        leaf = path.rsplit("/", 1)[-1]
        if leaf in ("kernel", "w", "gating_einsum", "linear", "input_embedding", "pos_embedding"):
            value = normal / np.sqrt(_fan_in(path, shape))
        elif leaf == "scale" and path.startswith("PaliGemma/img/"):
            # SigLIP's LayerNorms multiply by the scale itself (Gemma's RMSNorms by 1 + scale): near
            # 1, or every camera reaches the backbone some 40 times fainter than the prompt, and a
            # policy trained from these weights learns to ignore its cameras.
            value = 1.0 + 0.02 * normal
        else:
            value = 0.02 * normal
        _set(out, path, value.astype(dtype))
    return out


def _fan_in(path: str, shape: tuple[int, ...]) -> int:
    if path.endswith("attn_vec_einsum/w") or path.endswith("MultiHeadDotProductAttention_0/out/kernel"):
        return shape[-3] * shape[-2]  # heads x head_dim are contracted
    if any(path.endswith(f"{k}/kernel") for k in ("query", "key", "value")):
        return shape[-3]  # width -> heads x head_dim
    if path.endswith("embedding/kernel"):
        return shape[0] * shape[1] * shape[2]  # patch conv: h x w x channels
    if path.endswith("input_embedding") or path.endswith("pos_embedding"):
        return shape[-1]
    return shape[-2]


def _set(tree: dict, path: str, value) -> None:
    *parents, leaf = path.split("/")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value
