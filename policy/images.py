"""Camera images into the model's input: any HxWx3 uint8 to 224x224 in [-1, 1].

Resizing follows openpi's `resize_with_pad`: keep the aspect ratio (target size truncated with
`int()`), bilinear `jax.image.resize`, round back to uint8, centre with floor offsets and pad with
black. It runs on the host CPU device so it never competes with the model for the accelerator.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def check_image(name: str, image: object) -> np.ndarray:
    """Raises `ValueError` naming the camera unless the image is an HxWx3 uint8 array."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image {name!r} must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"image {name!r} must be uint8 (0..255), got dtype {image.dtype}")
    if image.ndim != 3 or image.shape[-1] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image {name!r} must have shape (H, W, 3), got {image.shape}")
    return image


@functools.partial(jax.jit, static_argnames=("size",))
def _resize_with_pad(image: jax.Array, size: int) -> jax.Array:
    h, w = image.shape[:2]
    ratio = max(w / size, h / size)
    rh, rw = int(h / ratio), int(w / ratio)
    resized = jax.image.resize(image.astype(jnp.float32), (rh, rw, 3), method="linear")
    resized = jnp.round(resized).clip(0, 255).astype(jnp.uint8)
    top, left = (size - rh) // 2, (size - rw) // 2
    return jnp.pad(resized, ((top, size - rh - top), (left, size - rw - left), (0, 0)))


def resize_with_pad(image: np.ndarray, size: int = 224) -> np.ndarray:
    if image.shape[:2] == (size, size):
        return image
    with jax.default_device(jax.devices("cpu")[0]):
        return np.asarray(_resize_with_pad(image, size))


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
