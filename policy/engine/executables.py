"""The engine's compiled executables: every phase lowered and compiled ahead of time per batch bucket.

Nothing compiles while serving: a batch runs on the executable of the smallest compiled bucket that
holds it, padded. The smallest bucket compiles before the engine serves; the others may compile on a
background thread, and until a bucket is ready a larger batch is split (`capacity()`). JAX's
persistent compilation cache (process-wide, set by `policy.engine.jax_setup.configure`) makes a restart's
compiles cache reads.
"""

from __future__ import annotations

import collections
import functools
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from configs.model_config import ModelConfig
from policy.engine import phases
from policy.engine.settings import EngineSettings
from policy.model import pi05, rtc

log = logging.getLogger(__name__)

# Every bucket gets all four: action-only rows, subtask start and segments, two-stage actions.
PHASES = ("action", "subtask_start", "subtask_segment", "action_from_image_tokens")
LOWERING_ATTEMPTS = 3


class Executables:
    """AOT-compiled phases of one model on one device, keyed by (phase, bucket), with run counts.

    From the engine's settings it takes what shapes every compile: the subtask budget
    (`max_decoding_steps_limit`), the segment length and the RTC method."""

    def __init__(self, cfg: ModelConfig, params: dict, device: jax.Device, settings: EngineSettings):
        self.cfg = cfg
        self.params = params
        self.device = device
        self.max_steps = settings.max_decoding_steps_limit
        self.segment = settings.decode_segment_tokens
        self.rtc_method = settings.rtc_method
        self._compiled: dict[tuple[str, int], Any] = {}
        self._ready: tuple[int, ...] = ()
        self._lock = threading.Lock()
        self.compiling_done = threading.Event()  # set by the engine once no more compiles will come
        # (phase, bucket) -> executions: what ran (tests count SigLIP passes with it).
        self.runs: collections.Counter[tuple[str, int]] = collections.Counter()
        # phase -> compiles done and their seconds: what a restart without the compile cache costs.
        self.compiles: collections.Counter[str] = collections.Counter()
        self.compile_seconds: collections.Counter[str] = collections.Counter()

    # ------------------------------------------------------------------ compiling

    def compile(self, buckets: Sequence[int], stop: threading.Event) -> None:
        """Compiles every phase for each bucket, logging each; a bucket serves once all are ready.

        Returns early once `stop` is set, between two compiles (one cannot be interrupted): an
        engine closing, or a process exiting, waits for at most the compile in progress."""
        for b in buckets:
            for phase in PHASES:
                if stop.is_set():
                    log.info("compiling stopped before %s for batch %d", phase, b)
                    return
                t0 = time.perf_counter()
                executable = self._lowered(phase, b).compile()
                seconds = time.perf_counter() - t0
                with self._lock:
                    self._compiled[(phase, b)] = executable
                    self.compiles[phase] += 1
                    self.compile_seconds[phase] += seconds
                log.info("compiled %s for batch %d in %.2f s", phase, b, seconds)
            with self._lock:
                self._ready = tuple(sorted({*self._ready, b}))

    def _lowered(self, phase: str, b: int) -> jax.stages.Lowered:
        """`lower`, tried again when JAX's tracing fails with a `KeyError` on one of its own variables.

        On the background thread, beside the first requests, that happened in about one run in ten
        on a loaded 2-core CPU (`KeyError: Var(id=...):float32[256]` inside `jit(...).lower`), and
        the engine then served every batch on its smallest bucket. Lowering has no side effect, and
        a second try has always succeeded."""
        for _ in range(LOWERING_ATTEMPTS - 1):
            try:
                return self.lower(phase, b)
            except KeyError as e:
                log.warning("lowering %s for batch %d failed inside JAX (%r); trying again", phase, b, e)
        return self.lower(phase, b)

    def lower(self, phase: str, b: int) -> jax.stages.Lowered:
        """The phase lowered for batch `b` (its text shows what runs: tests look for SigLIP's conv)."""
        spec = self._spec
        c, size, n = len(self.cfg.image_keys), self.cfg.siglip.image_size, self.cfg.max_token_len
        obs = pi05.Observation(
            images=spec((b, c, size, size, 3), jnp.uint8),  # scaled to [-1, 1] on the device
            image_mask=spec((b, c), jnp.bool_),
            tokens=spec((b, n), jnp.int32),
            token_mask=spec((b, n), jnp.bool_),
        )
        seeds, steps = spec((b,), jnp.uint32), spec((), jnp.int32)
        # Real-time chunking's columns (positional: the compiled call takes them after the steps) in
        # every action batch; rows without guidance carry zero weights and beta.
        h, e = self.cfg.action_horizon, self.cfg.action_dim
        guide = rtc.Guide(spec((b, h, e), jnp.float32), spec((b, h), jnp.float32), spec((b,), jnp.float32))
        decode = dict(cfg=self.cfg, max_steps=self.max_steps)
        start_args = (self.params, obs, seeds, spec((b,), jnp.int32), spec((b,), jnp.float32))
        if phase == "action":
            return phases.action_phase.lower(
                self.params, obs, seeds, steps, self.cfg, guide, rtc_method=self.rtc_method
            )
        if phase == "subtask_start":
            return phases.subtask_start.lower(*start_args, **decode)
        state, image_tokens = jax.eval_shape(functools.partial(phases.subtask_start, **decode), *start_args)
        if phase == "subtask_segment":
            state = jax.tree.map(lambda s: spec(s.shape, s.dtype), state)
            return phases.subtask_segment.lower(self.params, state, segment=self.segment, **decode)
        if phase == "action_from_image_tokens":
            tokens = spec(image_tokens.shape, image_tokens.dtype)
            no_images = pi05.Observation(None, obs.image_mask, obs.tokens, obs.token_mask)
            return phases.action_from_image_tokens.lower(
                self.params, tokens, no_images, seeds, steps, self.cfg, guide, rtc_method=self.rtc_method
            )
        raise ValueError(f"unknown phase {phase!r}; phases: {PHASES}")

    def _spec(self, shape, dtype) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype, sharding=jax.sharding.SingleDeviceSharding(self.device))

    # ------------------------------------------------------------------ serving

    def ready_buckets(self) -> tuple[int, ...]:
        return self._ready

    def capacity(self) -> int:
        """The most rows one batch may have now (0 before the first bucket is compiled)."""
        ready = self._ready
        return ready[-1] if ready else 0

    def bucket_for(self, n: int) -> int:
        return next(b for b in self._ready if b >= n)

    def run(self, phase: str, b: int, *args) -> Any:
        self.runs[(phase, b)] += 1
        return self._compiled[(phase, b)](self.params, *args)
