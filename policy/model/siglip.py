"""SigLIP image encoder (big_vision ViT, `pool_type="none"`) with its projection into the VLM width.

Axes: B batch of images, P patches (tokens), D encoder width, N heads, H head dim, F mlp width.
The patch embedding and position embedding run in float32 as openpi does; the encoder blocks run in
the compute dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from configs.model_config import SiglipConfig
from policy.model.layers import gelu, layer_norm


def _attention(p: dict, x: jax.Array) -> jax.Array:
    """flax `MultiHeadDotProductAttention` (self-attention, no mask)."""
    dt = x.dtype
    q, k, v = (
        jnp.einsum("BPD,DNH->BPNH", x, p[name]["kernel"].astype(dt)) + p[name]["bias"].astype(dt)
        for name in ("query", "key", "value")
    )
    q = q / jnp.sqrt(q.shape[-1]).astype(dt)
    logits = jnp.einsum("BPNH,BQNH->BNPQ", q, k)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(dt)
    out = jnp.einsum("BNPQ,BQNH->BPNH", probs, v)
    return jnp.einsum("BPNH,NHD->BPD", out, p["out"]["kernel"].astype(dt)) + p["out"]["bias"].astype(dt)


def _mlp(p: dict, x: jax.Array) -> jax.Array:
    dt = x.dtype
    h = gelu(x @ p["Dense_0"]["kernel"].astype(dt) + p["Dense_0"]["bias"].astype(dt))
    return h @ p["Dense_1"]["kernel"].astype(dt) + p["Dense_1"]["bias"].astype(dt)


def _encoder_block(x: jax.Array, p: dict) -> tuple[jax.Array, None]:
    x = x + _attention(p["MultiHeadDotProductAttention_0"], layer_norm(p["LayerNorm_0"], x))
    x = x + _mlp(p["MlpBlock_0"], layer_norm(p["LayerNorm_1"], x))
    return x, None


def embed_patches(p: dict, images: jax.Array, cfg: SiglipConfig) -> jax.Array:
    """Patch conv plus learned position embedding, in float32. images: (B, 224, 224, 3) in [-1, 1]."""
    kernel = p["embedding"]["kernel"].astype(jnp.float32)
    x = jax.lax.conv_general_dilated(
        images.astype(jnp.float32),
        kernel,
        window_strides=(cfg.patch_size, cfg.patch_size),
        padding="VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    x = x + p["embedding"]["bias"].astype(jnp.float32)
    b, h, w, d = x.shape
    return x.reshape(b, h * w, d) + p["pos_embedding"].astype(jnp.float32)


def encode(p: dict, images: jax.Array, cfg: SiglipConfig, dtype) -> jax.Array:
    """Image tokens for the prefix: (B, 224, 224, 3) -> (B, P, vlm width), not scaled by sqrt(width)."""
    if images.shape[1:] != (cfg.image_size, cfg.image_size, 3):
        raise ValueError(
            f"siglip expects images of shape (B, {cfg.image_size}, {cfg.image_size}, 3), got {images.shape}"
        )
    x = embed_patches(p, images, cfg).astype(dtype)
    x, _ = jax.lax.scan(_encoder_block, x, p["Transformer"]["encoderblock"])
    x = layer_norm(p["Transformer"]["encoder_norm"], x)
    return x @ p["head"]["kernel"].astype(dtype) + p["head"]["bias"].astype(dtype)
