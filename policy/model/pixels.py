"""The model's pixel range: uint8 camera values as the float32 in [-1, 1] that SigLIP was trained on.

The model's own input convention, so it lives with the model; the engine hands the model uint8
images and never converts them itself.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

# openpi's `x / 255 * 2 - 1` for every uint8 value, computed once on the host.
_UINT8_TO_MODEL = np.arange(256, dtype=np.float32) / 255.0 * 2.0 - 1.0


def to_model_range(image):
    """uint8 -> float32 in [-1, 1], bit for bit openpi's conversion, for numpy or JAX arrays.

    A table lookup rather than arithmetic: compiled code would turn the division into a
    multiplication by 1/255 and be off by an ulp.
    """
    if isinstance(image, np.ndarray):
        return _UINT8_TO_MODEL[image]
    return jnp.asarray(_UINT8_TO_MODEL)[image]
