"""The full-size pi05 configuration, checked without allocating a byte of weights."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from configs import get_model_config
from policy.model import pi05
from policy.model.params import count_params, flatten, param_specs


def _count(tree: dict, prefix: str, exclude: str | None = None) -> int:
    return sum(
        math.prod(leaf.shape)
        for path, leaf in flatten(tree)
        if path.startswith(prefix) and not (exclude and exclude in path)
    )


def test_full_pi05_parameter_count_matches_published_parts():
    cfg = get_model_config("pi05")
    specs = param_specs(cfg)
    # openpi's pi05: 3,353,433,872 parameters (reference/openpi_pi05.md §1).
    assert count_params(specs) == 3_353_433_872
    siglip = _count(specs, "PaliGemma/img")
    llm = dict(flatten(specs["PaliGemma"]["llm"]))
    expert = sum(math.prod(v.shape) for k, v in llm.items() if "_1/" in k or k.endswith("_1"))
    vlm = sum(math.prod(v.shape) for k, v in llm.items()) - expert
    heads = sum(_count(specs, k) for k in ("action_in_proj", "action_out_proj", "time_mlp_in", "time_mlp_out"))
    embedding = math.prod(llm["embedder/input_embedding"].shape)
    adarms = sum(math.prod(v.shape) for k, v in llm.items() if "Dense_0" in k)
    published = {"siglip": 414.8e6, "vlm": 2508.5e6, "expert": 427.9e6, "heads": 2.2e6, "embedding": 526.6e6}
    measured = {"siglip": siglip, "vlm": vlm, "expert": expert, "heads": heads, "embedding": embedding}
    for part, value in published.items():
        assert abs(measured[part] - value) < 0.05e6, f"{part}: {measured[part]} vs published {value}"
    assert abs(adarms - 116e6) < 1e6
    assert siglip + vlm + expert + heads == 3_353_433_872


def test_full_pi05_shapes_with_eval_shape():
    cfg = get_model_config("pi05")
    params = param_specs(cfg, jnp.bfloat16)
    b = 2
    obs = pi05.Observation(
        images=jax.ShapeDtypeStruct((b, 3, 224, 224, 3), jnp.float32),
        image_mask=jax.ShapeDtypeStruct((b, 3), jnp.bool_),
        tokens=jax.ShapeDtypeStruct((b, 200), jnp.int32),
        token_mask=jax.ShapeDtypeStruct((b, 200), jnp.bool_),
    )
    noise = jax.ShapeDtypeStruct((b, 50, 32), jnp.float32)
    prefix = jax.eval_shape(lambda p, o: pi05.prefill(p, o, cfg), params, obs)
    assert prefix.cache.k.shape == (18, b, 968, 1, 256)
    assert prefix.cache.k.dtype == jnp.bfloat16
    assert prefix.last_hidden.shape == (b, 2048)
    actions = jax.eval_shape(lambda p, o, n: pi05.sample_actions(p, o, n, cfg), params, obs, noise)
    assert actions.shape == (b, 50, 32) and actions.dtype == jnp.float32
