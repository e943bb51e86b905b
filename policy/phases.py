"""The two compiled phases the engine runs, each one jitted function over a padded batch.

Randomness is per row: a row's key is `key(seed)`, so its subtask draw and its flow noise are
the same whether it runs alone or inside a batch of strangers.
"""

from __future__ import annotations

import functools

import jax

from configs.model_config import ModelConfig
from policy import decoding, pi05

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


@functools.partial(jax.jit, static_argnames=("cfg",))
def action_phase(
    params: dict, obs: pi05.Observation, seeds: jax.Array, num_steps: jax.Array, cfg: ModelConfig
) -> jax.Array:
    """Prefill of the action prompt, per-row noise, Euler steps: actions (B, A, E) in model space."""
    noise = pi05.noise_from_keys(_row_keys(seeds, _NOISE_STREAM), cfg)
    return pi05.sample_actions(params, obs, noise, cfg, num_steps)
