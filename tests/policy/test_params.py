"""`policy.model.params.init_params`: random weights that train, as `runtime.training` starts from them."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from configs import get_model_config
from policy.model import params as params_lib
from policy.model import pi05


def test_random_weights_let_the_cameras_reach_the_backbone_as_strongly_as_the_prompt():
    # SigLIP's LayerNorms multiply by their scale (Gemma's norms by 1 + scale): initialized near 0,
    # the image tokens came out ~40x fainter than the prompt's and a policy learnt to ignore them.
    cfg = get_model_config("pi05_demo")
    params = params_lib.init_params(cfg, seed=0)
    rng = np.random.default_rng(0)
    size = cfg.siglip.image_size
    images = jnp.asarray(rng.integers(0, 256, (2, len(cfg.image_keys), size, size, 3), np.uint8))
    tokens = jnp.asarray(rng.integers(5, 200, (2, cfg.max_token_len)), jnp.int32)
    obs = pi05.Observation(images, jnp.ones((2, len(cfg.image_keys)), bool), tokens, jnp.ones(tokens.shape, bool))
    prefix, _ = pi05.embed_prefix(params, obs, cfg)
    n_image = prefix.shape[1] - cfg.max_token_len
    image_norm = float(jnp.linalg.norm(prefix[:, :n_image], axis=-1).mean())
    text_norm = float(jnp.linalg.norm(prefix[:, n_image:], axis=-1).mean())
    assert 0.5 < image_norm / text_norm < 2.0, (image_norm, text_norm)
    # Different images give clearly different image tokens.
    inverted = pi05.Observation(255 - images, obs.image_mask, tokens, obs.token_mask)
    other = pi05.encode_images(params, inverted, cfg)
    assert float(jnp.abs(other - prefix[:, :n_image]).mean()) > 0.1
