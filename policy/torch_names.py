"""The one table between Pi0.5's PyTorch state dict and openpi's parameter tree, read both ways.

openpi's PyTorch port (`PI0Pytorch`, which its JAX-to-PyTorch conversion writes) and LeRobot's
`PI05Policy` (the same modules under `model.`) name every weight after transformers' PaliGemma,
Gemma and SigLIP modules: one tensor per layer, linear weights stored (out, in), attention
projections with the heads flattened into one axis, the keys and values and the MLP's gate and up
projections as separate tensors. openpi's tree stacks the layers on a leading axis, stores kernels
(in, out), keeps heads as an axis and fuses K with V and gate with up. Each `Rule` below maps one
leaf of that tree to its PyTorch tensor(s) and back, so reading a checkpoint (`to_params`), writing
one (`to_torch`) and the names and shapes a checkpoint must hold (`torch_shapes`) all come from the
same rows and cannot disagree.

Names are those of `PI0Pytorch`; LeRobot's carry the `model.` prefix (`strip_prefix`). The VLM's
embedding is tied to its LM head: a checkpoint holds it as `TIED_EMBEDDING`, `EMBEDDING` or both.
The action expert's LM head is built and saved by both ports but never used: `UNUSED`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping

import jax
import numpy as np

from configs.model_config import GemmaConfig, ModelConfig
from policy.model.params import Params, flatten, param_specs

LEROBOT_PREFIX = "model."
_VLM = "paligemma_with_expert.paligemma.model.language_model"
_EXPERT = "paligemma_with_expert.gemma_expert.model"
_VISION = "paligemma_with_expert.paligemma.model.vision_tower.vision_model"
EMBEDDING = f"{_VLM}.embed_tokens.weight"
TIED_EMBEDDING = "paligemma_with_expert.paligemma.lm_head.weight"
UNUSED = "paligemma_with_expert.gemma_expert.lm_head.weight"

Array = np.ndarray


@dataclasses.dataclass(frozen=True)
class Rule:
    """One leaf of openpi's tree (`path`) and the PyTorch tensors it is made of (`names`, `{i}` the
    layer). With `depth`, openpi stacks one slice per layer on a leading axis; `to_jax` turns the
    tensors of one layer (one per name, in order) into that slice and `to_torch` back."""

    path: str
    names: tuple[str, ...]
    to_jax: Callable[[tuple[Array, ...]], Array]
    to_torch: Callable[[Array], tuple[Array, ...]]
    depth: int | None = None

    def tensor_names(self, layer: int | None) -> tuple[str, ...]:
        return tuple(n.format(i=layer) for n in self.names)


def _one(path: str, name: str, to_jax, to_torch, depth: int | None = None) -> Rule:
    return Rule(path, (name,), lambda t: to_jax(t[0]), lambda x: (to_torch(x),), depth)


def _same(x: Array) -> Array:
    return x


def _transposed(x: Array) -> Array:
    return x.T


def _linear(path: str, name: str, depth: int | None = None) -> list[Rule]:
    """nn.Linear `name` (weight (out, in), bias) as a Dense `path` (kernel (in, out), bias)."""
    return [
        _one(f"{path}/kernel", f"{name}.weight", _transposed, _transposed, depth),
        _one(f"{path}/bias", f"{name}.bias", _same, _same, depth),
    ]


def _heads_in(heads: int, head_dim: int, width: int):
    """(heads * head_dim, width) <-> openpi's einsum layout (heads, width, head_dim)."""
    return (
        lambda t: t.reshape(heads, head_dim, width).transpose(0, 2, 1),
        lambda x: x.transpose(0, 2, 1).reshape(heads * head_dim, width),
    )


def _fused(parts: int, to_jax, to_torch):
    """Several PyTorch tensors stacked on a new leading axis of openpi's slice (K with V, gate with up)."""
    return (
        lambda ts: np.stack([to_jax(t) for t in ts]),
        lambda x: tuple(to_torch(x[j]) for j in range(parts)),
    )


def _gemma(g: GemmaConfig, prefix: str, suffix: str, adaptive: bool) -> list[Rule]:
    """One Gemma tower: openpi's `..._1` leaves for the action expert, unsuffixed for the VLM."""
    layers, depth, layer = "PaliGemma/llm/layers", g.depth, f"{prefix}.layers.{{i}}"
    q_in, q_out = _heads_in(g.num_heads, g.head_dim, g.width)
    kv_in, kv_out = _heads_in(g.num_kv_heads, g.head_dim, g.width)
    rules = [
        _one(f"{layers}/attn/q_einsum{suffix}/w", f"{layer}.self_attn.q_proj.weight", q_in, q_out, depth),
        Rule(
            f"{layers}/attn/kv_einsum{suffix}/w",
            (f"{layer}.self_attn.k_proj.weight", f"{layer}.self_attn.v_proj.weight"),
            *_fused(2, kv_in, kv_out),
            depth,
        ),
        _one(
            f"{layers}/attn/attn_vec_einsum{suffix}/w",
            f"{layer}.self_attn.o_proj.weight",
            lambda t: t.T.reshape(g.num_heads, g.head_dim, g.width),
            lambda x: x.reshape(g.num_heads * g.head_dim, g.width).T,
            depth,
        ),
        Rule(
            f"{layers}/mlp{suffix}/gating_einsum",
            (f"{layer}.mlp.gate_proj.weight", f"{layer}.mlp.up_proj.weight"),
            *_fused(2, _transposed, _transposed),
            depth,
        ),
        _one(f"{layers}/mlp{suffix}/linear", f"{layer}.mlp.down_proj.weight", _transposed, _transposed, depth),
    ]
    norms = (
        (f"{layers}/pre_attention_norm{suffix}", f"{layer}.input_layernorm", depth),
        (f"{layers}/pre_ffw_norm{suffix}", f"{layer}.post_attention_layernorm", depth),
        (f"PaliGemma/llm/final_norm{suffix}", f"{prefix}.norm", None),
    )
    for path, name, norm_depth in norms:
        if adaptive:  # adaRMS: a Dense from the time conditioning to scale, shift and gate
            rules += _linear(f"{path}/Dense_0", f"{name}.dense", norm_depth)
        else:
            rules.append(_one(f"{path}/scale", f"{name}.weight", _same, _same, norm_depth))
    return rules


def _siglip(cfg: ModelConfig) -> list[Rule]:
    s, block = cfg.siglip, "PaliGemma/img/Transformer/encoderblock"
    layer, depth = f"{_VISION}.encoder.layers.{{i}}", cfg.siglip.depth
    n, h, d = s.num_heads, s.head_dim, s.width
    rules = [
        _one(
            "PaliGemma/img/embedding/kernel",
            f"{_VISION}.embeddings.patch_embedding.weight",
            lambda t: t.transpose(2, 3, 1, 0),  # conv (out, in, h, w) -> (h, w, in, out)
            lambda x: x.transpose(3, 2, 0, 1),
        ),
        _one("PaliGemma/img/embedding/bias", f"{_VISION}.embeddings.patch_embedding.bias", _same, _same),
        _one(
            "PaliGemma/img/pos_embedding",
            f"{_VISION}.embeddings.position_embedding.weight",
            lambda t: t[None],
            lambda x: x[0],
        ),
        _one(f"{block}/LayerNorm_0/scale", f"{layer}.layer_norm1.weight", _same, _same, depth),
        _one(f"{block}/LayerNorm_0/bias", f"{layer}.layer_norm1.bias", _same, _same, depth),
        _one(f"{block}/LayerNorm_1/scale", f"{layer}.layer_norm2.weight", _same, _same, depth),
        _one(f"{block}/LayerNorm_1/bias", f"{layer}.layer_norm2.bias", _same, _same, depth),
        *_linear(f"{block}/MlpBlock_0/Dense_0", f"{layer}.mlp.fc1", depth),
        *_linear(f"{block}/MlpBlock_0/Dense_1", f"{layer}.mlp.fc2", depth),
        _one(
            f"{block}/MultiHeadDotProductAttention_0/out/kernel",
            f"{layer}.self_attn.out_proj.weight",
            lambda t: t.T.reshape(n, h, d),
            lambda x: x.reshape(n * h, d).T,
            depth,
        ),
        _one(
            f"{block}/MultiHeadDotProductAttention_0/out/bias", f"{layer}.self_attn.out_proj.bias", _same, _same, depth
        ),
        _one("PaliGemma/img/Transformer/encoder_norm/scale", f"{_VISION}.post_layernorm.weight", _same, _same),
        _one("PaliGemma/img/Transformer/encoder_norm/bias", f"{_VISION}.post_layernorm.bias", _same, _same),
        *_linear("PaliGemma/img/head", "paligemma_with_expert.paligemma.model.multi_modal_projector.linear"),
    ]
    for jax_name, torch_name in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        attn = f"{block}/MultiHeadDotProductAttention_0/{jax_name}"
        rules += [
            _one(
                f"{attn}/kernel",
                f"{layer}.self_attn.{torch_name}.weight",
                lambda t: t.T.reshape(d, n, h),
                lambda x: x.reshape(d, n * h).T,
                depth,
            ),
            _one(
                f"{attn}/bias",
                f"{layer}.self_attn.{torch_name}.bias",
                lambda t: t.reshape(n, h),
                lambda x: x.reshape(n * h),
                depth,
            ),
        ]
    return rules


def rules(cfg: ModelConfig) -> list[Rule]:
    """Every leaf of `cfg`'s openpi tree, once, with its PyTorch tensors."""
    out = [
        *_siglip(cfg),
        _one("PaliGemma/llm/embedder/input_embedding", TIED_EMBEDDING, _same, _same),
        *_gemma(cfg.vlm, _VLM, "", adaptive=False),
        *_gemma(cfg.expert, _EXPERT, "_1", adaptive=True),
    ]
    for head in ("action_in_proj", "action_out_proj", "time_mlp_in", "time_mlp_out"):
        out += _linear(head, head)
    return out


def torch_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The PyTorch tensors (unprefixed) and shapes a checkpoint of `cfg` holds, the embedding under
    `TIED_EMBEDDING` and `UNUSED` left out: derived from `to_torch` without allocating a weight."""
    shapes = jax.eval_shape(lambda p: to_torch(p, cfg), param_specs(cfg))
    return {name: tuple(s.shape) for name, s in shapes.items()}


def unused_shape(cfg: ModelConfig) -> tuple[int, int]:
    """The shape of the action expert's LM head (`UNUSED`): the VLM's vocabulary by the expert's width."""
    return (cfg.vocab_size, cfg.expert.width)


def strip_prefix(names: Mapping[str, object]) -> str:
    """The prefix every name carries: `model.` in LeRobot's checkpoints, none in openpi's."""
    return LEROBOT_PREFIX if names and all(n.startswith(LEROBOT_PREFIX) for n in names) else ""


def _layers(rule: Rule) -> Iterator[int | None]:
    yield from (range(rule.depth) if rule.depth is not None else (None,))


def to_torch(params: Params, cfg: ModelConfig) -> dict[str, Array]:
    """openpi's tree as PyTorch tensors (unprefixed names; the embedding as `TIED_EMBEDDING`)."""
    leaves = dict(flatten(params))
    out: dict[str, Array] = {}
    for rule in rules(cfg):
        leaf = leaves[rule.path]
        for i in _layers(rule):
            tensors = rule.to_torch(leaf if i is None else leaf[i])
            out.update(zip(rule.tensor_names(i), tensors, strict=True))
    return out


def to_params(
    read: Callable[[str], Array], cfg: ModelConfig, dtype, on_leaf: Callable[[str, Array], object] | None = None
) -> Params:
    """openpi's tree from PyTorch tensors: `read(name)` gives one (unprefixed name, any float
    dtype). Each leaf is filled layer by layer into one array of `dtype`, then handed to `on_leaf`
    (path, array), whose result is stored (a device copy); host memory holds one leaf at a time."""
    specs = dict(flatten(param_specs(cfg)))
    tree: Params = {}
    for rule in rules(cfg):
        out = np.empty(specs[rule.path].shape, dtype)
        for i in _layers(rule):
            value = rule.to_jax(tuple(read(n) for n in rule.tensor_names(i)))
            if i is None:
                out[...] = value
            else:
                out[i] = value
        *parents, leaf = rule.path.split("/")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = on_leaf(rule.path, out) if on_leaf is not None else out
    return tree
