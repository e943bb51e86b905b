"""Autoregressive text decoding (the subtask) on top of the prefix KV cache.

Axes: B batch, S prefix length, N decoding budget, V vocabulary, L layers.

The cache is fixed-size, (L, B, S + N, K, H), written at an index. Decoding is split into `start`
(the first token, from the prefix pass) and `advance` (a `lax.while_loop` over the next few tokens),
with everything a later token needs carried in a `DecodeState`: the engine runs a subtask in
segments, so an action batch can run between two segments, and `generate` runs it in one call. The first
token comes from the prefix pass itself (the hidden state at the last valid prompt token); each
later token is fed at the next position (`sum(prefix_mask) + i`) and attends causally to the valid
prefix and the tokens before it, as openpi's reference decode does.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from configs.model_config import ModelConfig
from policy.model import gemma, pi05
from policy.model.gemma import KVCache
from policy.tokenizer import EOS_ID

PAD_ID = 0


def _sample(logits: jax.Array, temperature: jax.Array, key: jax.Array) -> jax.Array:
    """One row: greedy at temperature 0 (lowest index on ties), else softmax sampling."""
    greedy = jnp.argmax(logits, axis=-1)
    sampled = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6), axis=-1)
    return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """Everything decoding needs between two segments, on the device.

    step: () int32, the next token index; tokens: (B, N), PAD after a row stops; done: (B,);
    cache: (L, B, S + N, K, H); base: (B,) the first generated position; key_mask: (B, S + N) the
    valid prefix; limits, temperature: (B,); keys: (B,) typed PRNG keys.
    """

    step: jax.Array
    tokens: jax.Array
    done: jax.Array
    cache: KVCache
    base: jax.Array
    key_mask: jax.Array
    limits: jax.Array
    temperature: jax.Array
    keys: jax.Array


def _step_keys(keys: jax.Array, i: jax.Array) -> jax.Array:
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, i)


def start(
    params: dict,
    prefix: pi05.Prefix,
    limits: jax.Array,
    temperature: jax.Array,
    keys: jax.Array,
    max_steps: int,
) -> DecodeState:
    """The first token (from the prefix pass) and the cache grown by the decoding budget.

    limits: (B,) int32, each row's own budget (<= max_steps); temperature: (B,) float32;
    keys: (B,) typed PRNG keys, one per row so a row's draw does not depend on its batch.
    """
    llm = params["PaliGemma"]["llm"]
    b = prefix.mask.shape[0]
    pad = ((0, 0), (0, 0), (0, max_steps), (0, 0), (0, 0))
    cache = KVCache(jnp.pad(prefix.cache.k, pad), jnp.pad(prefix.cache.v, pad))
    first = jax.vmap(_sample)(gemma.logits(llm, prefix.last_hidden), temperature, _step_keys(keys, 0))
    return DecodeState(
        step=jnp.int32(1),
        tokens=jnp.full((b, max_steps), PAD_ID, jnp.int32).at[:, 0].set(first),
        done=(first == EOS_ID) | (limits <= 1),
        cache=cache,
        base=jnp.sum(prefix.mask, axis=1).astype(jnp.int32),  # first generated position, per row
        key_mask=jnp.concatenate([prefix.mask, jnp.zeros((b, max_steps), bool)], axis=1),
        limits=limits,
        temperature=temperature,
        keys=keys,
    )


def advance(params: dict, state: DecodeState, cfg: ModelConfig, max_steps: int, segment: int) -> DecodeState:
    """Up to `segment` more tokens (fewer once every row is done or the budget is reached)."""
    llm = params["PaliGemma"]["llm"]
    s = state.key_mask.shape[1] - max_steps
    dt = pi05.compute_dtype(cfg)
    sample = jax.vmap(_sample)
    stop = jnp.minimum(state.step + segment, max_steps)
    positions_after_prefix = jnp.arange(s + max_steps) >= s

    def cond(st: DecodeState):
        return (st.step < stop) & ~jnp.all(st.done)

    def step(st: DecodeState) -> DecodeState:
        i = st.step
        x = gemma.embed_tokens(llm, st.tokens[:, i - 1][:, None], dt)
        positions = (st.base + i - 1)[:, None]
        mask = st.key_mask | (positions_after_prefix & (jnp.arange(s + max_steps) < s + i))[None, :]
        h, cache = gemma.forward(
            llm, x, positions, mask[:, None, :], cfg.vlm, suffix="", cache=st.cache, write_index=s + i - 1
        )
        nxt = sample(gemma.logits(llm, h[:, 0]), st.temperature, _step_keys(st.keys, i))
        nxt = jnp.where(st.done, PAD_ID, nxt)
        done = st.done | (nxt == EOS_ID) | (i + 1 >= st.limits)
        return dataclasses.replace(st, step=i + 1, tokens=st.tokens.at[:, i].set(nxt), done=done, cache=cache)

    return jax.lax.while_loop(cond, step, state)


def lengths(tokens, limits, max_steps: int):
    """The number of tokens before EOS per row (the row's budget when it never emitted EOS).

    numpy in, numpy out (the engine, on the host, after segments) or traced (`generate`)."""
    xp = np if isinstance(tokens, np.ndarray) else jnp
    is_eos = tokens == EOS_ID
    n = xp.where(is_eos.any(axis=1), xp.argmax(is_eos, axis=1), xp.minimum(limits, max_steps))
    return n.astype(xp.int32)


def generate(
    params: dict,
    prefix: pi05.Prefix,
    limits: jax.Array,
    temperature: jax.Array,
    keys: jax.Array,
    cfg: ModelConfig,
    max_steps: int,
) -> tuple[jax.Array, jax.Array]:
    """Decodes up to `max_steps` tokens per row in one loop (see `start` for the arguments).

    Returns tokens (B, N), with EOS kept and PAD after a row stops, and lengths (B,), the number of
    tokens before EOS.
    """
    state = advance(params, start(params, prefix, limits, temperature, keys, max_steps), cfg, max_steps, max_steps)
    return state.tokens, lengths(state.tokens, limits, max_steps)
