"""Full-size pi05 with random bf16 weights on an accelerator (skipped by `.ci/run`: marker `gpu`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import get_model_config
from policy.engine import phases
from policy.model import pi05
from policy.model.params import init_params

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU: the full model is 6.7 GB of bf16"),
]


def test_full_pi05_two_phases_on_the_gpu():
    cfg = get_model_config("pi05")
    params = init_params(cfg, dtype=jnp.bfloat16)
    b = 2
    rng = np.random.default_rng(0)
    obs = pi05.Observation(
        images=rng.uniform(-1, 1, (b, 3, 224, 224, 3)).astype(np.float32),
        image_mask=np.ones((b, 3), bool),
        tokens=rng.integers(3, cfg.vocab_size, (b, 200)).astype(np.int32),
        token_mask=np.arange(200)[None, :].repeat(b, 0) < 60,
    )
    seeds = jnp.arange(b, dtype=jnp.uint32)
    actions = phases.action_phase(params, obs, seeds, jnp.int32(10), cfg)
    assert actions.shape == (b, 50, 32) and bool(jnp.isfinite(actions).all())
    tokens, lengths = phases.subtask_phase(params, obs, seeds, jnp.full((b,), 8, jnp.int32), jnp.zeros(b), cfg, 8)
    assert tokens.shape == (b, 8) and int(lengths.min()) >= 1
