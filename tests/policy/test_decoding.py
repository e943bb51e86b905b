"""Subtask decoding: the KV-cached loop against a full recompute and against openpi's reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from policy.engine import phases
from policy.model import decoding, gemma, pi05
from policy.model.layers import make_attn_mask


def _uncached_greedy(params, obs, cfg, steps):
    """The fixture's reference: recompute the whole sequence for every token, no cache."""
    llm = params["PaliGemma"]["llm"]
    prefix_tokens, prefix_mask = pi05.embed_prefix(params, obs, cfg)
    generated: list[int] = []
    all_logits = []
    for _ in range(steps):
        gen = jnp.asarray(generated, jnp.int32)[None, :]
        x = jnp.concatenate([prefix_tokens, gemma.embed_tokens(llm, gen, jnp.float32)], axis=1)
        mask = jnp.concatenate([prefix_mask, jnp.ones((1, len(generated)), bool)], axis=1)
        ar = jnp.concatenate([jnp.zeros(prefix_mask.shape[1], bool), jnp.ones(len(generated), bool)])
        positions = jnp.cumsum(mask, axis=1) - 1
        h, _ = gemma.forward(llm, x, positions, make_attn_mask(mask, ar), cfg.vlm, suffix="")
        last = int(jnp.argmax(positions[0]))
        logits = gemma.logits(llm, h[:, last])
        all_logits.append(np.asarray(logits[0]))
        generated.append(int(jnp.argmax(logits[0])))
    return np.array(generated), np.stack(all_logits)


def _greedy(params, obs, cfg, steps, batch=1):
    limits = jnp.full((batch,), steps, jnp.int32)
    temperature = jnp.zeros((batch,), jnp.float32)
    seeds = jnp.arange(batch, dtype=jnp.uint32)
    tokens, lengths = phases.subtask_phase(params, obs, seeds, limits, temperature, cfg, steps)
    return np.asarray(tokens), np.asarray(lengths)


def test_cached_greedy_matches_openpi_reference_tokens(tiny_params, fixture_obs, tiny_cfg, expected):
    obs, _, _ = fixture_obs
    tokens, lengths = _greedy(tiny_params, obs, tiny_cfg, 8)
    np.testing.assert_array_equal(tokens, expected["decode_tokens"])
    assert lengths.tolist() == [8]


def test_cached_equals_full_recompute(tiny_params, fixture_obs, tiny_cfg, expected):
    obs, _, _ = fixture_obs
    ref_tokens, ref_logits = _uncached_greedy(tiny_params, obs, tiny_cfg, 8)
    np.testing.assert_allclose(ref_logits, expected["decode_logits"][0], atol=5e-5)
    tokens, _ = _greedy(tiny_params, obs, tiny_cfg, 8)
    np.testing.assert_array_equal(tokens[0], ref_tokens)


def test_cached_equals_recompute_on_a_padded_prompt_with_a_masked_camera(tiny_params, fixture_obs, tiny_cfg):
    obs, _, _ = fixture_obs
    token_mask = np.asarray(obs.token_mask).copy()
    token_mask[:, 12:] = False  # a shorter prompt: more padding between prompt and generated text
    image_mask = np.array([[True, False, True]])
    obs = pi05.Observation(obs.images, image_mask, obs.tokens, token_mask)
    ref_tokens, _ = _uncached_greedy(tiny_params, obs, tiny_cfg, 6)
    tokens, _ = _greedy(tiny_params, obs, tiny_cfg, 6)
    np.testing.assert_array_equal(tokens[0], ref_tokens)


def test_row_limits_stop_each_row(tiny_params, fixture_obs, tiny_cfg):
    obs, _, _ = fixture_obs
    obs2 = jax.tree.map(lambda x: np.concatenate([x, x]), obs)
    limits = jnp.array([3, 8], jnp.int32)
    tokens, lengths = phases.subtask_phase(
        tiny_params, obs2, jnp.array([0, 1], jnp.uint32), limits, jnp.zeros(2), tiny_cfg, 8
    )
    tokens = np.asarray(tokens)
    assert lengths.tolist() == [3, 8]
    np.testing.assert_array_equal(tokens[0, :3], tokens[1, :3])
    assert (tokens[0, 3:] == decoding.PAD_ID).all()


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_sampling_is_seeded_per_row(tiny_params, fixture_obs, tiny_cfg, temperature):
    obs, _, _ = fixture_obs
    obs3 = jax.tree.map(lambda x: np.concatenate([x, x, x]), obs)
    seeds = jnp.array([7, 7, 8], jnp.uint32)
    temps = jnp.full((3,), temperature, jnp.float32)
    tokens, _ = phases.subtask_phase(tiny_params, obs3, seeds, jnp.full((3,), 8, jnp.int32), temps, tiny_cfg, 8)
    tokens = np.asarray(tokens)
    np.testing.assert_array_equal(tokens[0], tokens[1])  # same seed, same draw
    alone, _ = phases.subtask_phase(tiny_params, obs, seeds[:1], jnp.full((1,), 8, jnp.int32), temps[:1], tiny_cfg, 8)
    np.testing.assert_array_equal(np.asarray(alone)[0], tokens[0])  # batch does not change a row


def test_a_row_stops_at_eos(tiny_params, fixture_obs, tiny_cfg):
    """Greedy decoding of the fixture gives 476, 918, 918, ... and never EOS. With EOS's (tied)
    embedding a hair longer than 918's, EOS wins the second token: the row stops there, its length
    counts the tokens before EOS, PAD follows, and the loop ends without spending the budget."""
    obs, _, _ = fixture_obs
    tokens, _ = _greedy(tiny_params, obs, tiny_cfg, 8)
    assert tokens[0, :2].tolist() == [476, 918] and decoding.EOS_ID not in tokens[0]
    llm = tiny_params["PaliGemma"]["llm"]
    table = llm["embedder"]["input_embedding"]
    params = {**tiny_params, "PaliGemma": {**tiny_params["PaliGemma"], "llm": {**llm, "embedder": {
        "input_embedding": table.at[decoding.EOS_ID].set(1.001 * table[918])
    }}}}  # fmt: skip
    tokens, lengths = _greedy(params, obs, tiny_cfg, 8)
    assert tokens[0].tolist() == [476, decoding.EOS_ID] + [decoding.PAD_ID] * 6
    assert lengths.tolist() == [1]
    prefix = pi05.prefill(params, obs, tiny_cfg)
    keys = jax.random.key(0)[None]
    state = decoding.start(params, prefix, jnp.array([8], jnp.int32), jnp.zeros(1), keys, 8)
    state = decoding.advance(params, state, tiny_cfg, 8, segment=8)
    assert int(state.step) == 2  # stopped right after EOS, not at the budget


def test_segments_decode_the_same_tokens_as_one_loop(tiny_params, fixture_obs, tiny_cfg):
    """The engine decodes in segments with the state donated between calls: same tokens."""
    obs, _, _ = fixture_obs
    obs2 = jax.tree.map(lambda x: np.concatenate([x, x]), obs)
    seeds, limits, temps = jnp.array([3, 4], jnp.uint32), jnp.array([8, 5], jnp.int32), jnp.array([0.0, 1.5])
    whole, whole_lengths = phases.subtask_phase(tiny_params, obs2, seeds, limits, temps, tiny_cfg, 8)
    state, _ = phases.subtask_start(tiny_params, obs2, seeds, limits, temps, tiny_cfg, 8)
    calls = 0
    while int(state.step) < 8 and not np.asarray(state.done).all():
        state = phases.subtask_segment(tiny_params, state, tiny_cfg, 8, 3)
        calls += 1
    assert calls == 3  # tokens 1-3, 4-6, 7
    np.testing.assert_array_equal(state.tokens, whole)
    np.testing.assert_array_equal(decoding.lengths(np.asarray(state.tokens), np.asarray(limits), 8), whole_lengths)


def test_temperature_samples_differ_from_greedy_and_between_seeds(tiny_params, fixture_obs, tiny_cfg):
    obs, _, _ = fixture_obs
    obs3 = jax.tree.map(lambda x: np.concatenate([x, x, x]), obs)
    seeds = jnp.array([7, 8, 7], jnp.uint32)
    limits = jnp.full((3,), 8, jnp.int32)
    hot, _ = phases.subtask_phase(tiny_params, obs3, seeds, limits, jnp.full((3,), 2.0), tiny_cfg, 8)
    greedy, _ = phases.subtask_phase(tiny_params, obs3, seeds, limits, jnp.zeros(3), tiny_cfg, 8)
    hot, greedy = np.asarray(hot), np.asarray(greedy)
    assert (greedy == greedy[0]).all()  # temperature 0 ignores the seed
    assert (hot[0] != greedy[0]).sum() >= 4  # sampling at T=2 is not the greedy path
    assert (hot[0] != hot[1]).sum() >= 4  # seeds 7 and 8 draw differently
    np.testing.assert_array_equal(hot[0], hot[2])  # seed 7 again: the same draw
