"""Autoregressive text decoding (the subtask) on top of the prefix KV cache.

Axes: B batch, S prefix length, N decoding budget, V vocabulary, L layers.

The cache is fixed-size, (L, B, S + N, K, H), written at an index; the whole loop is one
`lax.while_loop`, so a subtask costs one launch and the host only sees the final tokens. The first
token comes from the prefix pass itself (the hidden state at the last valid prompt token); each
later token is fed at the next position (`sum(prefix_mask) + i`) and attends causally to the valid
prefix and the tokens before it, as openpi's reference decode does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from configs.model_config import ModelConfig
from policy import gemma, pi05
from policy.gemma import KVCache
from policy.tokenizer import EOS_ID

PAD_ID = 0


def _sample(logits: jax.Array, temperature: jax.Array, key: jax.Array) -> jax.Array:
    """One row: greedy at temperature 0 (lowest index on ties), else softmax sampling."""
    greedy = jnp.argmax(logits, axis=-1)
    sampled = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6), axis=-1)
    return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


def generate(
    params: dict,
    prefix: pi05.Prefix,
    limits: jax.Array,
    temperature: jax.Array,
    keys: jax.Array,
    cfg: ModelConfig,
    max_steps: int,
) -> tuple[jax.Array, jax.Array]:
    """Decodes up to `max_steps` tokens per row.

    limits: (B,) int32, each row's own budget (<= max_steps); temperature: (B,) float32;
    keys: (B,) typed PRNG keys, one per row so a row's draw does not depend on its batch.
    Returns tokens (B, N), with EOS kept and PAD after a row stops, and lengths (B,), the number of
    tokens before EOS.
    """
    llm = params["PaliGemma"]["llm"]
    b, s = prefix.mask.shape
    dt = pi05.compute_dtype(cfg)
    sample = jax.vmap(_sample)
    step_keys = lambda i: jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, i)  # noqa: E731

    pad = ((0, 0), (0, 0), (0, max_steps), (0, 0), (0, 0))
    cache = KVCache(jnp.pad(prefix.cache.k, pad), jnp.pad(prefix.cache.v, pad))
    base = jnp.sum(prefix.mask, axis=1).astype(jnp.int32)  # first generated position, per row
    key_mask = jnp.concatenate([prefix.mask, jnp.zeros((b, max_steps), bool)], axis=1)

    first = sample(gemma.logits(llm, prefix.last_hidden), temperature, step_keys(0))
    tokens = jnp.full((b, max_steps), PAD_ID, jnp.int32).at[:, 0].set(first)
    done = (first == EOS_ID) | (limits <= 1)

    def cond(carry):
        i, _, done, _ = carry
        return (i < max_steps) & ~jnp.all(done)

    def step(carry):
        i, tokens, done, cache = carry
        prev = tokens[:, i - 1]
        x = gemma.embed_tokens(llm, prev[:, None], dt)
        positions = (base + i - 1)[:, None]
        mask = key_mask | ((jnp.arange(s + max_steps) >= s) & (jnp.arange(s + max_steps) < s + i))[None, :]
        h, cache = gemma.forward(
            llm, x, positions, mask[:, None, :], cfg.vlm, suffix="", cache=cache, write_index=s + i - 1
        )
        nxt = sample(gemma.logits(llm, h[:, 0]), temperature, step_keys(i))
        nxt = jnp.where(done, PAD_ID, nxt)
        tokens = tokens.at[:, i].set(nxt)
        done = done | (nxt == EOS_ID) | (i + 1 >= limits)
        return i + 1, tokens, done, cache

    _, tokens, _, _ = jax.lax.while_loop(cond, step, (jnp.int32(1), tokens, done, cache))
    is_eos = tokens == EOS_ID
    lengths = jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1), jnp.minimum(limits, max_steps))
    return tokens, lengths.astype(jnp.int32)
