"""Pi0.5: the prefix pass into a KV cache, and flow-matching action sampling against it.

Axes: B batch, C cameras, P image tokens per camera, L prompt tokens, S prefix length
(C * P + L), A action horizon, E action dim, D width.

openpi's conventions throughout: t = 1 is noise and t = 0 is data; v approximates noise - action;
Euler steps with dt = -1 / num_steps and t accumulated in float32 (so the times are 1.0, 0.9,
0.79999995, ...); the state reaches the model only as text in the prompt.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from configs.model_config import ModelConfig
from policy.model import gemma, siglip
from policy.model.gemma import KVCache
from policy.model.layers import dense, make_attn_mask, posemb_sincos
from policy.model.pixels import to_model_range


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Observation:
    """Model inputs at the SigLIP resolution.

    images: (B, C, 224, 224, 3), float in [-1, 1] or uint8 (scaled on the device, as openpi does),
    cameras in `cfg.image_keys` order; image_mask: (B, C) bool;
    tokens: (B, L) int32, valid ids left-aligned; token_mask: (B, L) bool.
    """

    images: jax.Array
    image_mask: jax.Array
    tokens: jax.Array
    token_mask: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Prefix:
    """What the flow steps and the text decoder need from the prefix pass.

    cache: K/V of every prefix token, (L, B, S, K, H); mask: (B, S) valid tokens;
    last_hidden: (B, D) final-normed VLM output at the last valid token (the first decoded token's
    logits come from it).
    """

    cache: KVCache
    mask: jax.Array
    last_hidden: jax.Array


def compute_dtype(cfg: ModelConfig):
    return jnp.dtype(cfg.dtype)


def encode_images(params: dict, obs: Observation, cfg: ModelConfig) -> jax.Array:
    """SigLIP over every camera: (B, C * P, D) image tokens in the compute dtype.

    Separate from `embed_prefix` so that a two-stage request encodes its images once: the subtask
    phase returns these and the action phase takes them back (SigLIP sees no prompt, so its output
    is the same for both prompts)."""
    dt = compute_dtype(cfg)
    b, c = obs.image_mask.shape
    if obs.images.shape[:2] != (b, c) or c != len(cfg.image_keys):
        raise ValueError(
            f"images of shape {obs.images.shape} do not match image_mask {obs.image_mask.shape} "
            f"and the config's {len(cfg.image_keys)} cameras"
        )
    images = obs.images
    if images.dtype == jnp.uint8:
        images = to_model_range(images)
    img = images.reshape(b * c, *images.shape[2:])
    img_tokens = siglip.encode(params["PaliGemma"]["img"], img, cfg.siglip, dt)
    return img_tokens.reshape(b, c * img_tokens.shape[1], -1)


def embed_prefix(
    params: dict, obs: Observation, cfg: ModelConfig, image_tokens: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """[SigLIP(camera 0), ..., SigLIP(camera C-1), embed(prompt)]: (B, S, D) and its mask (B, S).

    `image_tokens` (from `encode_images`) skips SigLIP; `obs.images` is then not read."""
    dt = compute_dtype(cfg)
    if image_tokens is None:
        image_tokens = encode_images(params, obs, cfg)
    p = image_tokens.shape[1] // obs.image_mask.shape[1]
    img_mask = jnp.repeat(obs.image_mask, p, axis=1)
    txt_tokens = gemma.embed_tokens(params["PaliGemma"]["llm"], obs.tokens, dt)
    tokens = jnp.concatenate([image_tokens.astype(dt), txt_tokens], axis=1)
    mask = jnp.concatenate([img_mask, obs.token_mask], axis=1)
    return tokens, mask


def prefill(params: dict, obs: Observation, cfg: ModelConfig, image_tokens: jax.Array | None = None) -> Prefix:
    """The prefix through the VLM: bidirectional attention among valid tokens, K/V kept."""
    tokens, mask = embed_prefix(params, obs, cfg, image_tokens)
    attn_mask = make_attn_mask(mask, jnp.zeros(mask.shape[1], dtype=bool))
    positions = jnp.cumsum(mask, axis=1) - 1
    hidden, cache = gemma.forward(params["PaliGemma"]["llm"], tokens, positions, attn_mask, cfg.vlm, suffix="")
    last = jnp.argmax(positions, axis=1)  # index of the last valid token
    last_hidden = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    return Prefix(cache=cache, mask=mask, last_hidden=last_hidden)


def time_conditioning(params: dict, t: jax.Array, cfg: ModelConfig) -> jax.Array:
    """adaRMS conditioning from the flow time: swish(mlp_out(swish(mlp_in(sincos(t))))), float32."""
    emb = posemb_sincos(t, cfg.expert.width)
    emb = jax.nn.swish(dense(params["time_mlp_in"], emb))
    return jax.nn.swish(dense(params["time_mlp_out"], emb))


def velocity(params: dict, prefix: Prefix, x_t: jax.Array, t: jax.Array, cfg: ModelConfig) -> jax.Array:
    """v(x_t, t): the action tokens through the expert against the cached prefix. x_t: (B, A, E)."""
    b, a, _ = x_t.shape
    suffix = dense(params["action_in_proj"], x_t.astype(jnp.float32))
    cond = time_conditioning(params, jnp.broadcast_to(t, (b,)), cfg)
    # Action tokens see every valid prefix token and each other, never padding.
    mask = jnp.concatenate(
        [jnp.broadcast_to(prefix.mask[:, None, :], (b, a, prefix.mask.shape[1])), jnp.ones((b, a, a), bool)],
        axis=-1,
    )
    positions = jnp.sum(prefix.mask, axis=-1, keepdims=True) + jnp.arange(a)[None, :]
    dt = compute_dtype(cfg)
    out, _ = gemma.forward(
        params["PaliGemma"]["llm"],
        suffix.astype(dt),
        positions,
        mask,
        cfg.expert,
        suffix="_1",
        cond=cond.astype(dt),
        cache=prefix.cache,
    )
    return dense(params["action_out_proj"], out)


def velocity_joint(params: dict, obs: Observation, x_t: jax.Array, t: jax.Array, cfg: ModelConfig) -> jax.Array:
    """v(x_t, t) from one joint pass over [prefix, action tokens] with the combined mask: openpi's
    training path (`compute_loss`), equal to `velocity` against the cached prefix."""
    dt = compute_dtype(cfg)
    prefix_tokens, prefix_mask = embed_prefix(params, obs, cfg)
    b, a, _ = x_t.shape
    suffix = dense(params["action_in_proj"], x_t.astype(jnp.float32)).astype(dt)
    cond = time_conditioning(params, jnp.broadcast_to(t, (b,)), cfg).astype(dt)
    mask = jnp.concatenate([prefix_mask, jnp.ones((b, a), bool)], axis=1)
    ar = jnp.zeros(mask.shape[1], bool).at[prefix_mask.shape[1]].set(True)
    positions = jnp.cumsum(mask, axis=1) - 1
    _, out = gemma.forward_joint(
        params["PaliGemma"]["llm"],
        (prefix_tokens, suffix),
        positions,
        make_attn_mask(mask, ar),
        (cfg.vlm, cfg.expert),
        (None, cond),
    )
    return dense(params["action_out_proj"], out)


def denoise(params: dict, prefix: Prefix, noise: jax.Array, num_steps: int | jax.Array, cfg: ModelConfig) -> jax.Array:
    """Euler integration from t = 1 (noise) to t = 0, exactly openpi's loop and time arithmetic."""
    dt = jnp.float32(-1.0) / jnp.asarray(num_steps, jnp.float32)

    def step(carry):
        x_t, t = carry
        v = velocity(params, prefix, x_t, t, cfg)
        return x_t + dt * v.astype(jnp.float32), t + dt

    x_0, _ = jax.lax.while_loop(lambda c: c[1] >= -dt / 2, step, (noise.astype(jnp.float32), jnp.float32(1.0)))
    return x_0


def sample_actions(
    params: dict,
    obs: Observation,
    noise: jax.Array,
    cfg: ModelConfig,
    num_steps: int | jax.Array | None = None,
    image_tokens: jax.Array | None = None,
) -> jax.Array:
    """Actions (B, A, E) in model space (normalized, padded to action_dim) from the given noise."""
    prefix = prefill(params, obs, cfg, image_tokens)
    return denoise(params, prefix, noise, cfg.num_steps if num_steps is None else num_steps, cfg)


def noise_from_keys(keys: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Flow start x(t=1) drawn per row from its own key, so a row's noise does not depend on its batch."""
    return jax.vmap(lambda k: jax.random.normal(k, (cfg.action_horizon, cfg.action_dim), jnp.float32))(keys)


@functools.partial(jax.jit, static_argnames=("cfg",))
def prefill_jit(params: dict, obs: Observation, cfg: ModelConfig) -> Prefix:
    return prefill(params, obs, cfg)


@functools.partial(jax.jit, static_argnames=("cfg",))
def denoise_jit(params: dict, prefix: Prefix, noise: jax.Array, num_steps: jax.Array, cfg: ModelConfig) -> jax.Array:
    return denoise(params, prefix, noise, num_steps, cfg)


@functools.partial(jax.jit, static_argnames=("cfg",))
def sample_actions_jit(
    params: dict, obs: Observation, noise: jax.Array, num_steps: jax.Array, cfg: ModelConfig
) -> jax.Array:
    return sample_actions(params, obs, noise, cfg, num_steps)
