"""Camera images into the model's input: any HxWx3 uint8 to 224x224 in [-1, 1].

Resizing follows openpi's `resize_with_pad`: keep the aspect ratio (target size truncated with
`int()`), bilinear `jax.image.resize`, round back to uint8, centre with floor offsets and pad with
black. It runs on the host CPU device so it never competes with the model for the accelerator, and
`Resizer` compiles it ahead of time for the camera resolutions a server declares: a resolution
first seen while serving compiles once, with a log line, and the number of resolutions is bounded.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from configs import DEFAULT_IMAGE_RESOLUTIONS

log = logging.getLogger(__name__)


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
    """One image, compiled on first use of its shape (tests and tools; the engine uses `Resizer`)."""
    if image.shape[:2] == (size, size):
        return image
    with jax.default_device(jax.devices("cpu")[0]):
        return np.asarray(_resize_with_pad(image, size))


# Common robot camera resolutions (H, W): compiled at engine start.
DEFAULT_RESOLUTIONS = DEFAULT_IMAGE_RESOLUTIONS


class Resizer:
    """`resize_with_pad` with one executable per input resolution, compiled on the host CPU.

    `declared` resolutions compile in `warm()` (engine start). Another resolution compiles on
    first use with a warning, up to `max_resolutions` in all; beyond that `check` rejects it, so a
    stream of odd image sizes cannot keep a server compiling. Thread-safe: the engine's host pool
    calls it from several threads.
    """

    def __init__(self, size: int, declared: Iterable[tuple[int, int]] = DEFAULT_RESOLUTIONS, max_resolutions: int = 16):
        self.size = size
        self.declared = tuple(tuple(map(int, r)) for r in declared)
        self.max_resolutions = max(max_resolutions, len(self.declared))
        self._compiled: dict[tuple[int, int], object] = {}
        self._lock = threading.Lock()

    def warm(self) -> None:
        for hw in self.declared:
            self._executable(hw, declared=True)

    def check(self, name: str, image: np.ndarray) -> None:
        """Raises `ValueError` if this image's resolution would be one too many."""
        hw = image.shape[:2]
        if hw == (self.size, self.size) or hw in self._compiled or len(self._compiled) < self.max_resolutions:
            return
        raise ValueError(
            f"image {name!r} is {hw[0]}x{hw[1]}: this server already serves {len(self._compiled)} camera "
            f"resolutions, its limit; send one of {sorted(self._compiled)} or resize on the robot"
        )

    def __call__(self, image: np.ndarray) -> np.ndarray:
        hw = image.shape[:2]
        if hw == (self.size, self.size):
            return image
        return np.asarray(self._executable(hw)(image))

    def _executable(self, hw: tuple[int, int], declared: bool = False):
        executable = self._compiled.get(hw)
        if executable is not None:
            return executable
        with self._lock:
            if hw in self._compiled:
                return self._compiled[hw]
            if len(self._compiled) >= self.max_resolutions:
                raise ValueError(f"too many camera resolutions: {hw} would be number {len(self._compiled) + 1}")
            if not declared:
                log.warning(
                    "compiling the image resize for undeclared camera resolution %dx%d while serving; "
                    "declare it in the engine's image_resolutions",
                    *hw,
                )
            start = time.perf_counter()
            cpu = jax.devices("cpu")[0]
            spec = jax.ShapeDtypeStruct((*hw, 3), jnp.uint8, sharding=jax.sharding.SingleDeviceSharding(cpu))
            executable = _resize_with_pad.lower(spec, size=self.size).compile()
            self._compiled[hw] = executable
            log.debug("resize for %dx%d compiled in %.2f s", *hw, time.perf_counter() - start)
            return executable


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
