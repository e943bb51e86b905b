"""Parity with openpi's own pi05 on the tiny fixture: actions and every recorded intermediate."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from policy.checkpoint import load_params
from policy.model import gemma, pi05, siglip
from policy.model.layers import make_attn_mask


def _valid(a: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.asarray(a)[np.asarray(mask)]


def test_actions_match_openpi_float32(tiny_params, fixture_obs, tiny_cfg, expected):
    obs, noise, num_steps = fixture_obs
    actions = pi05.sample_actions_jit(tiny_params, obs, noise, jnp.int32(num_steps), tiny_cfg)
    assert actions.shape == expected["actions"].shape == (1, 50, 32)
    err = float(np.abs(np.asarray(actions) - expected["actions"]).max())
    assert err <= 1e-4, f"max abs error vs openpi float32 actions: {err:.3e}"


def test_actions_bf16_within_openpi_precision_spread(fixture_dir, fixture_obs, expected, fixture_provenance):
    from configs import get_model_config

    cfg = get_model_config("pi05_tiny_bf16")
    params = load_params(fixture_dir, cfg, dtype=jnp.bfloat16)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(params))
    obs, noise, num_steps = fixture_obs
    actions = np.asarray(pi05.sample_actions_jit(params, obs, noise, jnp.int32(num_steps), cfg))
    err_bf16 = float(np.abs(actions - expected["actions_bf16"]).max())
    spread = fixture_provenance["checks"]["bf16_vs_f32_actions_max_abs"]
    print(f"bf16 max abs error vs openpi actions_bf16: {err_bf16:.3e} (openpi's own bf16-vs-f32 spread {spread:.3e})")
    assert err_bf16 <= spread
    # bf16 really ran: the result is not the float32 one.
    assert float(np.abs(actions - expected["actions"]).max()) > 1e-4


def test_siglip_intermediates(tiny_params, fixture_obs, tiny_cfg, expected):
    obs, _, _ = fixture_obs
    img_params = tiny_params["PaliGemma"]["img"]
    image = obs.images[:, 0]
    with_posemb = siglip.embed_patches(img_params, image, tiny_cfg.siglip)
    np.testing.assert_allclose(with_posemb, expected["siglip_base_0_rgb_with_posemb"], atol=2e-5)
    tokens = siglip.encode(img_params, image, tiny_cfg.siglip, jnp.float32)
    np.testing.assert_allclose(tokens, expected["siglip_base_0_rgb_tokens"], atol=2e-5)


def test_prefix_and_kv_cache(tiny_params, fixture_obs, tiny_cfg, expected):
    obs, _, _ = fixture_obs
    tokens, mask = pi05.embed_prefix(tiny_params, obs, tiny_cfg)
    np.testing.assert_array_equal(mask, expected["prefix_mask"])
    np.testing.assert_allclose(tokens, expected["prefix_tokens"], atol=2e-5)
    prefix = pi05.prefill_jit(tiny_params, obs, tiny_cfg)
    m = expected["prefix_mask"]
    for layer in (0, 3):
        np.testing.assert_allclose(
            _valid(prefix.cache.k[layer], m), _valid(expected[f"prefix_k_layer{layer}"], m), atol=5e-5
        )
        np.testing.assert_allclose(
            _valid(prefix.cache.v[layer], m), _valid(expected[f"prefix_v_layer{layer}"], m), atol=5e-5
        )
    np.testing.assert_allclose(prefix.last_hidden, expected["decode_hidden0"], atol=5e-5)


def test_flow_step_intermediates(tiny_params, fixture_obs, tiny_cfg, expected):
    obs, _, _ = fixture_obs
    cond = pi05.time_conditioning(tiny_params, jnp.ones((1,), jnp.float32), tiny_cfg)
    np.testing.assert_allclose(cond, expected["adarms_cond_step0"], atol=1e-5)
    prefix = pi05.prefill_jit(tiny_params, obs, tiny_cfg)
    for step in (0, 5, 9):
        t = jnp.float32(expected["euler_times"][step])
        v = pi05.velocity(tiny_params, prefix, expected["euler_x"][step], t, tiny_cfg)
        np.testing.assert_allclose(v, expected["euler_v"][step], atol=5e-5, err_msg=f"velocity at step {step}")


def test_euler_times_accumulate_in_float32(monkeypatch, expected):
    """The times `denoise` evaluates the velocity at are openpi's: t += dt in float32 (so 0.79999995,
    not 0.8) and the loop runs while t >= -dt / 2."""
    seen: list[float] = []

    def record_time(params, prefix, x_t, t, cfg):
        jax.debug.callback(lambda t: seen.append(np.float32(t)), t)
        return jnp.zeros_like(x_t)

    monkeypatch.setattr(pi05, "velocity", record_time)
    jax.block_until_ready(pi05.denoise({}, None, jnp.zeros((1, 2, 3)), 10, None))
    jax.effects_barrier()
    np.testing.assert_array_equal(np.array(seen, np.float32), expected["euler_times"])


@pytest.mark.parametrize("num_steps", [1, 3])
def test_num_steps_changes_the_integration(tiny_params, fixture_obs, tiny_cfg, num_steps):
    """`num_steps` Euler steps from the noise, each x += dt * v(x, t) with dt = -1 / num_steps."""
    obs, noise, _ = fixture_obs
    prefix = pi05.prefill_jit(tiny_params, obs, tiny_cfg)
    x = np.asarray(pi05.denoise_jit(tiny_params, prefix, noise, jnp.int32(num_steps), tiny_cfg))
    dt = np.float32(-1.0) / np.float32(num_steps)
    expected_x, t = np.asarray(noise, np.float32), np.float32(1.0)
    for _ in range(num_steps):
        v = np.asarray(pi05.velocity(tiny_params, prefix, expected_x, jnp.float32(t), tiny_cfg))
        expected_x, t = expected_x + dt * v, np.float32(t + dt)
    np.testing.assert_allclose(x, expected_x, atol=1e-5)
    ten = np.asarray(pi05.denoise_jit(tiny_params, prefix, noise, jnp.int32(10), tiny_cfg))
    assert np.abs(x - ten).max() > 1e-3  # the step count is not ignored


def test_make_attn_mask_prefix_lm():
    input_mask = jnp.array([[True, True, True, False, True, True]])
    ar = jnp.array([False, False, False, False, True, False])
    m = np.asarray(make_attn_mask(input_mask, ar))[0]
    assert m[0, :3].all() and not m[0, 4:].any()  # prefix never sees the suffix
    assert m[4, [0, 1, 2, 4, 5]].all()  # suffix sees valid prefix and itself, bidirectionally
    assert not m[:, 3].any() and not m[3].any()  # padding neither sees nor is seen


def test_tied_lm_head_matches_decode_logits(tiny_params, expected):
    logits = gemma.logits(tiny_params["PaliGemma"]["llm"], jnp.asarray(expected["decode_hidden0"]))
    np.testing.assert_allclose(logits, expected["decode_logits0"], atol=1e-5)


def test_joint_two_expert_pass_equals_the_cached_path(tiny_params, fixture_obs, tiny_cfg, expected):
    """openpi's training path (both towers in one pass, attention shared in every layer) gives the
    velocity the inference path computes against the KV cache, and openpi's own."""
    obs, _, _ = fixture_obs
    prefix = pi05.prefill_jit(tiny_params, obs, tiny_cfg)
    for step in (0, 6):
        x, t = expected["euler_x"][step], jnp.float32(expected["euler_times"][step])
        joint = jax.jit(pi05.velocity_joint, static_argnames="cfg")(tiny_params, obs, x, t, tiny_cfg)
        cached = pi05.velocity(tiny_params, prefix, x, t, tiny_cfg)
        np.testing.assert_allclose(joint, cached, atol=5e-5)
        np.testing.assert_allclose(joint, expected["euler_v"][step], atol=5e-5)


def test_uint8_images_are_scaled_on_the_device_bit_for_bit(tiny_params, fixture_inputs, fixture_obs, tiny_cfg):
    """The engine sends uint8 (a quarter of the bytes); the device scaling equals openpi's."""
    obs, noise, num_steps = fixture_obs
    uint8 = np.stack([fixture_inputs[f"image_uint8_{k}"] for k in tiny_cfg.image_keys], axis=1)
    obs_u8 = pi05.Observation(uint8, obs.image_mask, obs.tokens, obs.token_mask)
    steps = jnp.int32(num_steps)
    from_float = pi05.sample_actions_jit(tiny_params, obs, noise, steps, tiny_cfg)
    from_uint8 = pi05.sample_actions_jit(tiny_params, obs_u8, noise, steps, tiny_cfg)
    np.testing.assert_array_equal(np.asarray(from_uint8), np.asarray(from_float))
