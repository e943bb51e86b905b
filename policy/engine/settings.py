"""`EngineSettings`: everything that shapes one `AsyncPi05Inference`, checked once, before any work.

One frozen value instead of a long keyword list: a server builds it from its flags, a test or a
benchmark from a few fields, and the engine, its compiles and its health report all read the same
object. A bad value is a `ValueError` naming the field when the settings are made, not a failure
minutes later on the device thread (or, for a bucket of 0, deep in a compile).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax.numpy as jnp

from configs import DEFAULT_MODEL, get_model_config
from policy.engine.images import DEFAULT_RESOLUTIONS
from policy.model import rtc


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    """The model, where its files are, and the limits the engine serves within.

    `batch_buckets` and `image_resolutions` accept any sequence and are kept as tuples, so a
    settings value shared between engines cannot change under one of them.
    """

    config_name: str = DEFAULT_MODEL
    """A model config (`configs.get_model_config`); an unknown name fails here, with a suggestion."""
    gpu_id: int | None = None
    """Index into `jax.devices()` (checked against them at start, when JAX is up); None: the first."""
    checkpoint_dir: str | Path | None = None
    """An openpi checkpoint directory (or its `params/`), local or an fsspec URL such as
    `gs://openpi-assets/checkpoints/pi05_droid`, fetched into the download cache at start. None:
    random weights (the embedded default)."""
    tokenizer_path: str | Path | None = None
    """Path or URL; None: the shipped tokenizer, or PaliGemma's, fetched."""
    norm_stats: str | Path | None = None
    """openpi's `norm_stats.json` or a checkpoint's `assets/<asset_id>/` folder (path or URL). None:
    the checkpoint's `assets/<config asset id>/`; state and actions pass unnormalized only for a
    config without an asset id or without a checkpoint."""
    param_dtype: str | None = None
    """The weights' floating dtype on the device; None: the config's."""
    max_batch: int = 8
    """The most requests one device batch holds."""
    batch_buckets: tuple[int, ...] = (1, 2, 4, 8)
    """Batch sizes to compile (those above `max_batch` are dropped, `max_batch` is added): a batch
    runs padded to the smallest compiled bucket that holds it. Each costs a compile at start."""
    batch_window_ms: float = 3.0
    """How long a partial batch waits for more requests. Finite: the scheduler sleeps on it."""
    max_decoding_steps_limit: int = 32
    """The largest subtask token budget a request may ask for; the decode loop compiles for it."""
    decode_segment_tokens: int = 4
    """Subtask tokens decoded between two chances for an action batch to run."""
    num_steps: int | None = None
    """Flow-matching steps per action chunk; None: the config's."""
    deadline_s: float = 5.0
    """The deadline of a request that carries none. Finite: a request must leave the queue."""
    max_queue: int = 64
    """Requests in flight (queued, preparing or running) before `EngineBusy` answers at once."""
    host_workers: int = 2
    """Threads resizing images and tokenizing prompts while the device runs the previous batch."""
    image_resolutions: tuple[tuple[int, int], ...] = DEFAULT_RESOLUTIONS
    """Camera resolutions (height, width) whose resize compiles at start and stays compiled."""
    max_image_resolutions: int = 16
    """How many resolutions stay compiled in all: another evicts the least recently used undeclared
    one, and new ones compile at a bounded rate (`policy.engine.images.Resizer`)."""
    max_image_side: int = 4096
    """The largest image side a request may send: bounds the host memory and compile one image costs."""
    compile_in_background: bool = True
    """Serve once the smallest bucket is compiled and compile the rest on a thread (larger batches
    split until theirs are ready); False: `start()` returns with every bucket compiled."""
    rtc_method: rtc.Method = "vjp"
    """How real-time chunking guides the flow (`policy.model.rtc`): "vjp", the exact vector-Jacobian
    product through the action expert (a backward pass per step, only in batches with a guided row),
    or "identity", the cheaper approximation. Compiled once, for every request."""
    seed: int = 0
    """Seeds the random weights (without a checkpoint) and the seeds of requests that carry none;
    >= 0, as numpy's generator requires."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "batch_buckets", tuple(self.batch_buckets))
        object.__setattr__(self, "image_resolutions", tuple(tuple(r) for r in self.image_resolutions))
        get_model_config(self.config_name)  # raises ValueError naming the known configs
        if self.gpu_id is not None and self.gpu_id < 0:
            raise ValueError(f"gpu_id must be >= 0 (an index into jax.devices()), got {self.gpu_id}")
        if self.param_dtype is not None:
            self._check_dtype(self.param_dtype)
        for name in (
            "max_batch",
            "max_decoding_steps_limit",
            "decode_segment_tokens",
            "max_queue",
            "host_workers",
            "max_image_resolutions",
            "max_image_side",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if any(b < 1 for b in self.batch_buckets):
            raise ValueError(f"batch_buckets must all be >= 1, got {self.batch_buckets}")
        if not (0 <= self.batch_window_ms and math.isfinite(self.batch_window_ms)):
            raise ValueError(f"batch_window_ms must be finite and >= 0, got {self.batch_window_ms}")
        if self.num_steps is not None and self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1 (or None for the config's), got {self.num_steps}")
        if not (0 < self.deadline_s and math.isfinite(self.deadline_s)):
            raise ValueError(f"deadline_s must be finite and > 0, got {self.deadline_s}")
        for hw in self.image_resolutions:
            if len(hw) != 2 or not all(1 <= side <= self.max_image_side for side in hw):
                raise ValueError(
                    f"image_resolutions must be (height, width) pairs of 1..{self.max_image_side} "
                    f"(max_image_side) pixels, got {hw}"
                )
        if self.rtc_method not in rtc.METHODS:
            raise ValueError(f"rtc_method must be one of {rtc.METHODS}, got {self.rtc_method!r}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    @staticmethod
    def _check_dtype(name: str) -> None:
        try:
            dtype = jnp.dtype(name)
        except TypeError:
            raise ValueError(f"param_dtype {name!r} is not a dtype") from None
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"param_dtype must be a floating dtype, got {name!r}")

    @property
    def buckets(self) -> tuple[int, ...]:
        """The batch sizes that compile, ascending: `batch_buckets` up to `max_batch`, and `max_batch`."""
        return tuple(sorted({b for b in self.batch_buckets if b <= self.max_batch} | {self.max_batch}))
