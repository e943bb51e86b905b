"""Numerics shared by the towers, written to match openpi's (flax) arithmetic step for step.

Precision rules follow openpi: norm statistics, RoPE, attention logits and softmax run in float32
whatever the compute dtype; everything else runs in the activations' dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ATTN_MASK_FILL = -2.3819763e38  # openpi/big_vision's "big negative" for masked logits
RMS_EPS = 1e-6
LAYERNORM_EPS = 1e-6


def gelu(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


def dense(p: dict, x: jax.Array) -> jax.Array:
    """flax `nn.Dense` with `dtype=x.dtype`: inputs and weights meet in the activations' dtype."""
    return x @ p["kernel"].astype(x.dtype) + p["bias"].astype(x.dtype)


def rms_normalize(x: jax.Array) -> jax.Array:
    """x / rms(x) with the variance in float32; returns float32 like openpi before its final cast."""
    var = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
    return x * jnp.reciprocal(jnp.sqrt(var + RMS_EPS))


def rms_norm(p: dict, x: jax.Array) -> jax.Array:
    """Gemma's RMSNorm: the scale is stored as an offset from 1."""
    return (rms_normalize(x) * (1 + p["scale"].astype(jnp.float32))).astype(x.dtype)


def ada_rms_norm(p: dict, x: jax.Array, cond: jax.Array) -> tuple[jax.Array, jax.Array]:
    """pi05's adaptive RMSNorm: `cond` (B, D) gives scale, shift and the residual gate."""
    modulation = dense(p["Dense_0"], cond.astype(x.dtype))[:, None, :]
    scale, shift, gate = jnp.split(modulation, 3, axis=-1)
    normed = rms_normalize(x) * (1 + scale) + shift
    return normed.astype(x.dtype), gate


def layer_norm(p: dict, x: jax.Array) -> jax.Array:
    """flax `nn.LayerNorm`: statistics in float32, output in the input dtype."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + LAYERNORM_EPS)
    return (y * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)).astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, max_wavelength: float = 10_000.0) -> jax.Array:
    """Rotary embedding on the two halves of the head dim. x: (B, T, N, H); positions: (B, T)."""
    half = x.shape[-1] // 2
    freq_exponents = (2.0 / x.shape[-1]) * jnp.arange(half, dtype=jnp.float32)
    timescale = max_wavelength**freq_exponents
    radians = positions[..., None].astype(jnp.float32) / timescale[None, None, :]
    radians = radians[..., None, :]
    sin, cos = jnp.sin(radians), jnp.cos(radians)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def posemb_sincos(t: jax.Array, width: int, min_period: float = 4e-3, max_period: float = 4.0) -> jax.Array:
    """openpi's flow-time embedding, laid out `[sin, cos]`. t: (B,) -> (B, width) float32."""
    fraction = jnp.linspace(0.0, 1.0, width // 2)
    period = min_period * (max_period / min_period) ** fraction
    angles = jnp.einsum(
        "i,j->ij", t.astype(jnp.float32), 1.0 / period * 2 * jnp.pi, precision=jax.lax.Precision.HIGHEST
    )
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def make_attn_mask(input_mask: jax.Array, ar_mask: jax.Array) -> jax.Array:
    """big_vision's rule: i sees j iff both are valid and cumsum(ar)[j] <= cumsum(ar)[i].

    input_mask: (B, S) bool; ar_mask: (S,) or (B, S) bool. Returns (B, S, S).
    """
    ar_mask = jnp.broadcast_to(ar_mask, input_mask.shape)
    cumsum = jnp.cumsum(ar_mask, axis=1)
    attn = cumsum[:, None, :] <= cumsum[:, :, None]
    valid = input_mask[:, None, :] & input_mask[:, :, None]
    return attn & valid
