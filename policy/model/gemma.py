"""One Gemma tower (the VLM or the action expert) run over a block of tokens, with a KV cache.

Axes: B batch, T query tokens, S key tokens, D width, N query heads, K kv heads, G = N / K,
H head dim, F mlp width, L layers.

At inference the two towers of Pi0.5 never run on the same tokens: the prefix goes through the
VLM, and each flow step sends the action tokens through the expert against the prefix's cached K/V.
So a tower is run alone, reading the other's keys through the cache; that is openpi's joint
attention restricted to the tokens of one expert, and gives the same numbers.

Parameters are openpi's layer-stacked tree; `suffix` picks the expert ("" for the VLM, "_1" for the
action expert) and `cond` switches the norms to adaptive mode (pi05's action expert).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from configs.model_config import GemmaConfig
from policy.model.layers import ATTN_MASK_FILL, ada_rms_norm, gelu, rms_norm, rope


class KVCache(NamedTuple):
    """Keys (RoPE applied) and values of every layer: each (L, B, S, K, H)."""

    k: jax.Array
    v: jax.Array


def _norm(p: dict, x: jax.Array, cond: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
    if cond is None:
        return rms_norm(p, x), None
    return ada_rms_norm(p, x, cond)


def _residual(x: jax.Array, y: jax.Array, gate: jax.Array | None) -> jax.Array:
    return x + y if gate is None else x + y * gate


def _mlp(p: dict, x: jax.Array) -> jax.Array:
    w = p["gating_einsum"].astype(x.dtype)
    h = gelu(x @ w[0]) * (x @ w[1])
    return h @ p["linear"].astype(x.dtype)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, cfg: GemmaConfig) -> jax.Array:
    """q: (B, T, N, H); k, v: (B, S, K, H); mask: (B, T, S) -> (B, T, N, H)."""
    b, t, n, h = q.shape
    q = q.reshape(b, t, cfg.num_kv_heads, n // cfg.num_kv_heads, h)
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)
    logits = jnp.where(mask[:, None, None, :, :], logits, ATTN_MASK_FILL)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)
    return out.reshape(b, t, n, h)


def _qkv(p: dict, h: jax.Array, positions: jax.Array, cfg: GemmaConfig) -> tuple[jax.Array, ...]:
    """Queries (scaled, RoPE'd), keys (RoPE'd) and values of one expert's tokens."""
    dt = h.dtype
    q = jnp.einsum("BTD,NDH->BTNH", h, p["q"].astype(dt))
    k, v = jnp.einsum("BSD,CKDH->CBSKH", h, p["kv"].astype(dt))
    return rope(q, positions) * jnp.asarray(cfg.head_dim**-0.5, dt), rope(k, positions), v


def _ffw(p: dict, x: jax.Array, cond: jax.Array | None) -> jax.Array:
    h, gate = _norm(p["pre_ffw_norm"], x, cond)
    return _residual(x, _mlp(p["mlp"], h), gate)


def _layer_params(layers: dict, suffix: str) -> dict:
    attn = layers["attn"]
    return {
        "q": attn[f"q_einsum{suffix}"]["w"],
        "kv": attn[f"kv_einsum{suffix}"]["w"],
        "o": attn[f"attn_vec_einsum{suffix}"]["w"],
        "mlp": layers[f"mlp{suffix}"],
        "pre_attention_norm": layers[f"pre_attention_norm{suffix}"],
        "pre_ffw_norm": layers[f"pre_ffw_norm{suffix}"],
    }


def forward(
    llm: dict,
    x: jax.Array,
    positions: jax.Array,
    mask: jax.Array,
    cfg: GemmaConfig,
    *,
    suffix: str,
    cond: jax.Array | None = None,
    cache: KVCache | None = None,
    write_index: jax.Array | None = None,
) -> tuple[jax.Array, KVCache]:
    """Runs the tower's layers and its final norm.

    x: (B, T, D) in the compute dtype; positions: (B, T); mask: (B, T, S_total).

    Three cache modes, one per inference phase:
    - no cache: attention over x itself; returns x's K/V (prefill);
    - cache, no `write_index`: attention over [cache, x]; the cache is read only and returned
      unchanged (flow steps against the prefix);
    - cache and `write_index`: x's K/V are written into the fixed-size cache at that index, then
      attention runs over the whole cache (autoregressive decoding); returns the updated cache.
    """
    dt = x.dtype

    def layer(x, xs):
        p, ck, cv = xs
        h, gate = _norm(p["pre_attention_norm"], x, cond)
        q, k, v = _qkv(p, h, positions, cfg)
        if ck is None:
            keys, values, new_k, new_v = k, v, k, v
        elif write_index is None:
            keys, values = jnp.concatenate([ck, k], axis=1), jnp.concatenate([cv, v], axis=1)
            new_k = new_v = None  # read only: nothing to stack up
        else:
            new_k = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), write_index, axis=1)
            new_v = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), write_index, axis=1)
            keys, values = new_k, new_v
        attn = _attend(q, keys.astype(dt), values.astype(dt), mask, cfg)
        x = _residual(x, jnp.einsum("BTNH,NHD->BTD", attn, p["o"].astype(dt)), gate)
        return _ffw(p, x, cond), (new_k, new_v)

    params = _layer_params(llm["layers"], suffix)
    xs = (params, None, None) if cache is None else (params, cache.k, cache.v)
    x, (k, v) = jax.lax.scan(layer, x, xs)
    x, _ = _norm(llm[f"final_norm{suffix}"], x, cond)
    return x, (cache if k is None else KVCache(k, v))


def forward_joint(
    llm: dict,
    xs: tuple[jax.Array, jax.Array],
    positions: jax.Array,
    mask: jax.Array,
    cfgs: tuple[GemmaConfig, GemmaConfig],
    conds: tuple[jax.Array | None, jax.Array | None],
) -> tuple[jax.Array, jax.Array]:
    """Both towers in one pass, as openpi trains: each token uses its own expert's weights, and the
    two experts' queries, keys and values meet in one attention in every layer.

    xs: (VLM tokens (B, S, D0), expert tokens (B, T, D1)); positions: (B, S + T); mask:
    (B, S + T, S + T). Returns both towers' final-normed outputs.
    """
    sizes = [x.shape[1] for x in xs]
    pos = (positions[:, : sizes[0]], positions[:, sizes[0] :])
    params = (_layer_params(llm["layers"], ""), _layer_params(llm["layers"], "_1"))

    def layer(carry, p):
        qkv, gates = [], []
        for x, pe, cfg, cond, ps in zip(carry, p, cfgs, conds, pos, strict=True):
            h, gate = _norm(pe["pre_attention_norm"], x, cond)
            qkv.append(_qkv(pe, h, ps, cfg))
            gates.append(gate)
        q, k, v = (jnp.concatenate(parts, axis=1) for parts in zip(*qkv, strict=True))
        attn = _attend(q, k, v, mask, cfgs[0])
        outs = []
        for x, pe, gate, cond, a in zip(carry, p, gates, conds, jnp.split(attn, [sizes[0]], axis=1), strict=True):
            x = _residual(x, jnp.einsum("BTNH,NHD->BTD", a.astype(x.dtype), pe["o"].astype(x.dtype)), gate)
            outs.append(_ffw(pe, x, cond))
        return tuple(outs), None

    outs, _ = jax.lax.scan(layer, tuple(xs), params)
    finals = (_norm(llm["final_norm"], outs[0], conds[0])[0], _norm(llm["final_norm_1"], outs[1], conds[1])[0])
    return finals


def embed_tokens(llm: dict, tokens: jax.Array, dtype) -> jax.Array:
    """Gemma's `Embedder.encode`: table lookup times sqrt(width), the constant in the table's dtype."""
    table = llm["embedder"]["input_embedding"]
    x = table[tokens]
    return (x * jnp.sqrt(table.shape[-1]).astype(table.dtype)).astype(dtype)


def logits(llm: dict, h: jax.Array) -> jax.Array:
    """The tied LM head (`Embedder.decode`), in float32."""
    table = llm["embedder"]["input_embedding"]
    return jnp.einsum("...D,VD->...V", h.astype(jnp.float32), table.astype(jnp.float32))
