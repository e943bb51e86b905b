"""Camera images into the model's input: any HxWx3 uint8 to 224x224 uint8 (the model scales them to
[-1, 1] itself, `policy.model.pixels`).

Resizing follows openpi's `resize_with_pad`: keep the aspect ratio (target size truncated with
`int()`), bilinear `jax.image.resize`, round back to uint8, centre with floor offsets and pad with
black. It runs on the host CPU device so it never competes with the model for the accelerator, and
`Resizer` compiles it ahead of time for the camera resolutions a server declares: a resolution
first seen while serving compiles once, with a log line; how many such resolutions stay compiled,
and how fast new ones compile, is bounded.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable

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

    `declared` resolutions compile in `warm()` (engine start) and stay. Another resolution compiles
    on first use, with a log line, into `max_resolutions - len(declared)` slots (at least one); when
    they are full the least recently used undeclared resolution is evicted, with a log line, so odd
    sizes seen once never lock a camera out until a restart. An executable a caller already holds
    keeps working after its eviction: evicting only drops this object's reference.

    A flood of odd sizes is bounded by a rate, not a count: new compiles (0.1 to 0.25 s of a host
    core each, measured on a 2-core CPU) draw on a bucket of `compile_burst`, refilled by one every
    `compile_interval_s`; beyond it `check` refuses a new resolution, saying when to retry, so a
    flood costs the server at most that share of one core. A camera used at least once every
    `(slots - compile_burst) * compile_interval_s` seconds (8 s by default) is never evicted by a
    flood: each eviction needs a compile, and the flood cannot compile faster.

    Thread-safe: the engine's host pool calls it from several threads. Callers that need the same
    new resolution share one compile, and a compile never holds up callers of compiled ones.
    """

    def __init__(
        self,
        size: int,
        declared: Iterable[tuple[int, int]] = DEFAULT_RESOLUTIONS,
        max_resolutions: int = 16,
        *,
        compile_burst: int = 4,
        compile_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        if compile_burst < 1 or not compile_interval_s > 0:
            raise ValueError(
                f"compile_burst must be >= 1 and compile_interval_s > 0, got {compile_burst} and {compile_interval_s}"
            )
        self.size = size
        self.declared = tuple(tuple(map(int, r)) for r in declared)
        self.slots = max(max_resolutions - len(self.declared), 1)
        self.compile_burst = compile_burst
        self.compile_interval_s = compile_interval_s
        self._clock = clock
        self._tokens = float(compile_burst)
        self._refilled = clock()
        self._declared: dict[tuple[int, int], jax.stages.Compiled] = {}
        # Undeclared resolutions, least recently used first.
        self._recent: collections.OrderedDict[tuple[int, int], jax.stages.Compiled] = collections.OrderedDict()
        self._pending: dict[tuple[int, int], concurrent.futures.Future] = {}
        self._lock = threading.Lock()

    @property
    def compiled(self) -> tuple[tuple[int, int], ...]:
        """The resolutions compiled now: the declared ones, then the others, least recently used first."""
        with self._lock:
            return (*self._declared, *self._recent)

    def warm(self) -> None:
        for hw in self.declared:
            executable = self._compile(hw)
            with self._lock:
                self._declared[hw] = executable

    def check(self, name: str, image: np.ndarray) -> None:
        """Raises `ValueError` if this image's resolution needs a compile that the rate refuses now."""
        hw = (int(image.shape[0]), int(image.shape[1]))
        with self._lock:
            if hw == (self.size, self.size) or hw in self._declared or hw in self._recent or hw in self._pending:
                return
            wait = self._wait()
        if wait > 0:
            raise ValueError(self._refusal(name, hw, wait))

    def __call__(self, image: np.ndarray, name: str | None = None) -> np.ndarray:
        """The image at the model's resolution; `name` (its camera) names it in a refusal."""
        hw = image.shape[:2]
        if hw == (self.size, self.size):
            return image
        return np.asarray(self.executable(hw, name)(image))

    def executable(self, hw: tuple[int, int], name: str | None = None) -> jax.stages.Compiled:
        """The compiled resize for `hw`, compiled now if it is not (`ValueError` beyond the rate)."""
        hw = (int(hw[0]), int(hw[1]))
        with self._lock:
            if (executable := self._declared.get(hw)) is not None:
                return executable
            if (executable := self._recent.get(hw)) is not None:
                self._recent.move_to_end(hw)
                return executable
            pending = self._pending.get(hw)
            mine = pending is None
            if mine:
                if (wait := self._wait()) > 0:
                    raise ValueError(self._refusal(name, hw, wait))
                self._tokens -= 1
                pending = self._pending[hw] = concurrent.futures.Future()
        if not mine:  # another thread compiles it: share its result
            return pending.result()
        log.warning(
            "compiling the image resize for undeclared camera resolution %dx%d while serving; "
            "declare it in the engine's image_resolutions",
            *hw,
        )
        try:
            executable = self._compile(hw)
        except BaseException as e:
            with self._lock:
                del self._pending[hw]
            pending.set_exception(e)
            raise
        with self._lock:
            del self._pending[hw]
            self._recent[hw] = executable
            evicted = self._recent.popitem(last=False)[0] if len(self._recent) > self.slots else None
        pending.set_result(executable)
        if evicted is not None:
            log.warning(
                "evicted the image resize for camera resolution %dx%d, the least recently used of %d undeclared "
                "ones; it compiles again if it comes back",
                *evicted,
                self.slots,
            )
        return executable

    def _wait(self) -> float:
        """Seconds until a new compile is allowed (0: now), the bucket refilled to now. Under the lock."""
        now = self._clock()
        self._tokens = min(float(self.compile_burst), self._tokens + (now - self._refilled) / self.compile_interval_s)
        self._refilled = now
        return 0.0 if self._tokens >= 1 else (1 - self._tokens) * self.compile_interval_s

    def _refusal(self, name: str | None, hw: tuple[int, int], wait: float) -> str:
        image = "an image" if name is None else f"image {name!r}"
        return (
            f"{image} is {hw[0]}x{hw[1]}, a camera resolution this server has not compiled, and it compiles new "
            f"ones at most {self.compile_burst} at once and then one every {self.compile_interval_s:g} s: retry in "
            f"{wait:.1f} s, send one of the declared resolutions {list(self.declared)}, or resize on the robot"
        )

    def _compile(self, hw: tuple[int, int]) -> jax.stages.Compiled:
        start = time.perf_counter()
        cpu = jax.devices("cpu")[0]
        spec = jax.ShapeDtypeStruct((*hw, 3), jnp.uint8, sharding=jax.sharding.SingleDeviceSharding(cpu))
        executable = _resize_with_pad.lower(spec, size=self.size).compile()
        log.debug("resize for %dx%d compiled in %.2f s", *hw, time.perf_counter() - start)
        return executable
