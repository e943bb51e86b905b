"""The compiled phases the engine runs, each one jitted function over a padded batch.

Randomness is per row: a row's key is `key(seed)`, so its subtask draw and its flow noise are
the same whether it runs alone or inside a batch of strangers.

The engine serves a subtask in pieces: `subtask_start` (SigLIP, the prefix pass, the first token;
it also returns the image tokens), then `subtask_segment` a few tokens at a time with the decoding
state donated from one call to the next, then `action_from_image_tokens`, which reuses those image
tokens instead of running SigLIP again. `subtask_phase` is the same decoding in one call.

The two action phases take real-time chunking's per-row `rtc.Guide` (the engine always passes one,
zeros for rows without guidance) and its method as a static argument; without a guide they are
the plain sampler.
"""

from __future__ import annotations

import functools

import jax

from configs.model_config import ModelConfig
from policy.model import decoding, pi05, rtc

_SUBTASK_STREAM, _NOISE_STREAM = 0, 1


def _row_keys(seeds: jax.Array, stream: int) -> jax.Array:
    return jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), stream))(seeds)


@functools.partial(jax.jit, static_argnames=("cfg", "max_steps"))
def subtask_phase(
    params: dict,
    obs: pi05.Observation,
    seeds: jax.Array,
    limits: jax.Array,
    temperature: jax.Array,
    cfg: ModelConfig,
    max_steps: int,
) -> tuple[jax.Array, jax.Array]:
    """Prefill of the subtask prompt, then decoding: tokens (B, max_steps) and lengths (B,)."""
    prefix = pi05.prefill(params, obs, cfg)
    return decoding.generate(params, prefix, limits, temperature, _row_keys(seeds, _SUBTASK_STREAM), cfg, max_steps)


@functools.partial(jax.jit, static_argnames=("cfg", "max_steps"))
def subtask_start(
    params: dict,
    obs: pi05.Observation,
    seeds: jax.Array,
    limits: jax.Array,
    temperature: jax.Array,
    cfg: ModelConfig,
    max_steps: int,
) -> tuple[decoding.DecodeState, jax.Array]:
    """SigLIP, the subtask prompt's prefill and its first token: the decoding state and the image
    tokens (B, C * P, D) for the action phase."""
    image_tokens = pi05.encode_images(params, obs, cfg)
    prefix = pi05.prefill(params, obs, cfg, image_tokens)
    keys = _row_keys(seeds, _SUBTASK_STREAM)
    return decoding.start(params, prefix, limits, temperature, keys, max_steps), image_tokens


@functools.partial(jax.jit, static_argnames=("cfg", "max_steps", "segment"), donate_argnums=(1,))
def subtask_segment(
    params: dict, state: decoding.DecodeState, cfg: ModelConfig, max_steps: int, segment: int
) -> decoding.DecodeState:
    """Up to `segment` more tokens; the state's buffers (the KV cache above all) are donated."""
    return decoding.advance(params, state, cfg, max_steps, segment)


def _sample(
    params: dict,
    obs: pi05.Observation,
    seeds: jax.Array,
    num_steps: jax.Array,
    cfg: ModelConfig,
    guide: rtc.Guide | None,
    rtc_method: rtc.Method,
    image_tokens: jax.Array | None = None,
) -> jax.Array:
    noise = pi05.noise_from_keys(_row_keys(seeds, _NOISE_STREAM), cfg)
    if guide is None:
        return pi05.sample_actions(params, obs, noise, cfg, num_steps, image_tokens)
    prefix = pi05.prefill(params, obs, cfg, image_tokens)
    return rtc.denoise(params, prefix, noise, num_steps, cfg, guide, rtc_method)


@functools.partial(jax.jit, static_argnames=("cfg", "rtc_method"))
def action_phase(
    params: dict,
    obs: pi05.Observation,
    seeds: jax.Array,
    num_steps: jax.Array,
    cfg: ModelConfig,
    guide: rtc.Guide | None = None,
    rtc_method: rtc.Method = "vjp",
) -> jax.Array:
    """Prefill of the action prompt, per-row noise, Euler steps: actions (B, A, E) in model space.

    With a `guide` (the engine always passes one: zero weight and beta for rows without real-time
    chunking) the steps are guided per row; without one this is the plain sampler."""
    return _sample(params, obs, seeds, num_steps, cfg, guide, rtc_method)


@functools.partial(jax.jit, static_argnames=("cfg", "rtc_method"))
def action_from_image_tokens(
    params: dict,
    image_tokens: jax.Array,
    obs: pi05.Observation,
    seeds: jax.Array,
    num_steps: jax.Array,
    cfg: ModelConfig,
    guide: rtc.Guide | None = None,
    rtc_method: rtc.Method = "vjp",
) -> jax.Array:
    """`action_phase` on image tokens from `subtask_start`: no SigLIP (`obs.images` is not read)."""
    return _sample(params, obs, seeds, num_steps, cfg, guide, rtc_method, image_tokens)
