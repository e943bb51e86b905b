"""`AsyncPi05Inference`: two-stage Pi0.5 inference behind an asyncio API that batches robots.

All model work runs on one worker thread that owns the device; the event loop only validates,
enqueues and awaits a future. The worker takes the first waiting request, collects more for at most
`batch_window_ms` (up to `max_batch`), pads the batch to a fixed bucket so nothing recompiles, and
runs the subtask phase for the rows that ask for one, then the action phase. Each row carries its
own seed, so a caller gets the result it would get alone.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from configs import DEFAULT_MODEL, get_model_config
from policy import checkpoint, params, phases, pi05
from policy.images import check_image, resize_with_pad
from policy.normalize import IDENTITY, Normalizer, load_norm_stats
from policy.prompts import Prompts
from policy.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

DEFAULT_COMPILE_CACHE = Path("~/.cache/pi05-runtime/jax").expanduser()
_STOP = object()


@dataclasses.dataclass(frozen=True)
class _Request:
    """A validated request, host-side; `kind` is "infer" or "subtask"."""

    kind: str
    images: Mapping[str, np.ndarray]
    task: str
    low_level_prompt: str | None
    generate_subtask: bool
    state: np.ndarray | None
    max_decoding_steps: int
    temperature: float
    seed: int
    submitted: float


@dataclasses.dataclass
class _Pending:
    request: _Request
    future: concurrent.futures.Future
    subtask: str | None = None
    subtask_tokens: list[int] = dataclasses.field(default_factory=list)
    subtask_ms: float = 0.0
    action_ms: float = 0.0
    actions: np.ndarray | None = None


class AsyncPi05Inference:
    """Pi0.5 subtask generation and action prediction for many robots at once.

    `checkpoint_dir` is an openpi checkpoint directory (or its `params/`); without one the model gets
    random weights (the embedded default). `norm_stats` is openpi's `norm_stats.json` or a
    checkpoint's `assets/<asset_id>/` folder; without it state and actions pass unnormalized.
    `gpu_id` picks the device. Call `await start()` (or use `async with`) before serving.
    """

    def __init__(
        self,
        config_name: str = DEFAULT_MODEL,
        gpu_id: int | None = None,
        checkpoint_dir: str | Path | None = None,
        *,
        tokenizer_path: str | Path | None = None,
        norm_stats: str | Path | None = None,
        param_dtype: str | None = None,
        max_batch: int = 8,
        batch_buckets: Sequence[int] = (1, 2, 4, 8),
        batch_window_ms: float = 3.0,
        max_decoding_steps_limit: int = 32,
        num_steps: int | None = None,
        compile_cache_dir: str | Path | None = DEFAULT_COMPILE_CACHE,
        compile_in_background: bool = True,
        preallocate_gpu_memory: bool = False,
        seed: int = 0,
    ):
        self.cfg = get_model_config(config_name)
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        buckets = sorted({b for b in batch_buckets if b <= max_batch} | {max_batch})
        self.buckets: tuple[int, ...] = tuple(buckets)
        self.max_batch = max_batch
        self.max_decoding_steps_limit = max_decoding_steps_limit
        self.num_steps = num_steps or self.cfg.num_steps
        self._window_s = batch_window_ms / 1e3
        self._gpu_id = gpu_id
        self._checkpoint_dir = Path(checkpoint_dir).expanduser() if checkpoint_dir else None
        self._param_dtype = param_dtype or self.cfg.dtype
        self._compile_cache_dir = Path(compile_cache_dir).expanduser() if compile_cache_dir else None
        self._seed_rng = np.random.default_rng(seed)
        self._init_seed = seed
        if not preallocate_gpu_memory:
            # Only effective before JAX starts its backend; a serving process starts here first.
            os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        self.tokenizer = load_tokenizer(self.cfg, tokenizer_path)
        self.prompts = Prompts(self.cfg, self.tokenizer)
        self.normalizer: Normalizer = IDENTITY if norm_stats is None else load_norm_stats(norm_stats)
        self.robot_action_dim = self.normalizer.actions.dim if self.normalizer.actions else self.cfg.action_dim
        self.state_dim = self.normalizer.state.dim if self.normalizer.state else None
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._ready = concurrent.futures.Future()
        self._compiled: dict[tuple[str, int], Any] = {}
        self._compile_in_background = compile_in_background
        self._compiler: threading.Thread | None = None
        self._all_compiled = threading.Event()
        self._compile_started = 0.0
        self.device = None
        self.startup_s: dict[str, float] = {}
        # (phase, real rows) -> count of executed batches: how well requests are being batched.
        self.batch_counts: collections.Counter[tuple[str, int]] = collections.Counter()

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Loads the weights and compiles the smallest bucket on the worker thread, then serves.

        The other buckets compile on a background thread (`compile_in_background`, the default), so
        a server answers within seconds; until a bucket is ready, larger batches are split."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="pi05-engine", daemon=True)
            self._thread.start()
        await asyncio.wrap_future(self._ready)

    async def close(self) -> None:
        """Finishes the requests already queued, then stops the worker (and waits for compiles)."""
        if self._thread is not None:
            self._queue.put(_STOP)
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        if self._compiler is not None:
            await asyncio.to_thread(self._compiler.join)
            self._compiler = None

    async def __aenter__(self) -> AsyncPi05Inference:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def info(self) -> dict[str, Any]:
        """What a health check reports about the model."""
        return {
            "config": self.cfg.name,
            "dtype": self._param_dtype,
            "device": str(self.device) if self.device is not None else None,
            "checkpoint": str(self._checkpoint_dir) if self._checkpoint_dir else None,
            "image_keys": list(self.cfg.image_keys),
            "action_horizon": self.cfg.action_horizon,
            "action_dim": self.robot_action_dim,
            "state_dim": self.state_dim,
            "max_batch": self.max_batch,
            "batch_buckets": list(self.buckets),
            "max_decoding_steps_limit": self.max_decoding_steps_limit,
            "num_steps": self.num_steps,
        }

    # ----------------------------------------------------------------- public API

    async def infer(
        self,
        images: Mapping[str, np.ndarray],
        high_level_prompt: str,
        low_level_prompt: str | None = None,
        state: Sequence[float] | np.ndarray | None = None,
        generate_subtask: bool = True,
        max_decoding_steps: int = 25,
        temperature: float = 0.1,
        seed: int | None = None,
    ) -> dict[str, Any]:
        """Subtask (unless disabled) then an action chunk of shape (horizon, robot action dim).

        Returns `actions`, `subtask`, `subtask_tokens`, `state` and `timing` {`total_ms`,
        `action_ms`, `subtask_ms`}. Raises `ValueError` on bad input before any device work.
        """
        request = self._validate(
            "infer", images, high_level_prompt, low_level_prompt, state, generate_subtask,
            max_decoding_steps, temperature, seed,
        )  # fmt: skip
        return await self._submit(request)

    async def generate_subtask(
        self,
        images: Mapping[str, np.ndarray],
        high_level_prompt: str,
        state: Sequence[float] | np.ndarray | None = None,
        max_decoding_steps: int = 25,
        temperature: float = 0.1,
        seed: int | None = None,
    ) -> dict[str, Any]:
        """The subtask stage alone (periodic refreshes): `subtask`, `subtask_tokens`, `timing`."""
        request = self._validate(
            "subtask", images, high_level_prompt, None, state, True, max_decoding_steps, temperature, seed
        )
        return await self._submit(request)

    async def _submit(self, request: _Request) -> dict[str, Any]:
        if self._thread is None:
            raise RuntimeError("the engine is not started: await engine.start() first")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put(_Pending(request, future))
        return await asyncio.wrap_future(future)

    # ----------------------------------------------------------------- validation

    def _validate(
        self, kind, images, task, low_level_prompt, state, generate_subtask, max_decoding_steps, temperature, seed
    ) -> _Request:
        if not isinstance(images, Mapping) or not images:
            raise ValueError(
                f"images must be a non-empty mapping of camera name to image; cameras: {list(self.cfg.image_keys)}"
            )
        unknown = [k for k in images if k not in self.cfg.image_keys]
        if unknown:
            raise ValueError(f"unknown camera {unknown[0]!r}; this model's cameras are {list(self.cfg.image_keys)}")
        checked = {k: check_image(k, v) for k, v in images.items()}
        if not isinstance(task, str) or not task.strip():
            raise ValueError("high_level_prompt must be a non-empty string")
        if low_level_prompt is not None and (not isinstance(low_level_prompt, str) or not low_level_prompt.strip()):
            raise ValueError("low_level_prompt must be a non-empty string when given")
        state_arr = self._check_state(state)
        if isinstance(max_decoding_steps, bool) or not isinstance(max_decoding_steps, int | np.integer):
            raise ValueError(f"max_decoding_steps must be an integer, got {max_decoding_steps!r}")
        decodes = kind == "subtask" or bool(generate_subtask)
        if decodes and not 1 <= max_decoding_steps <= self.max_decoding_steps_limit:
            raise ValueError(
                f"max_decoding_steps must be in 1..{self.max_decoding_steps_limit}, got {max_decoding_steps}"
            )
        if isinstance(temperature, bool) or not isinstance(temperature, int | float | np.floating):
            raise ValueError(f"temperature must be a number, got {temperature!r}")
        if not (math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
        if seed is None:
            seed = int(self._seed_rng.integers(0, 2**31))
        elif isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= seed < 2**32:
            raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
        # Token budget: the prompt this request will certainly need must fit.
        normalized = None if state_arr is None else self.normalizer.normalize_state(state_arr)
        if decodes:
            self.prompts.tokenize(self.prompts.subtask_text(task, normalized))
        else:
            self.prompts.tokenize(self.prompts.action_text(task, normalized, low_level_prompt))
        return _Request(
            kind=kind,
            images=checked,
            task=task,
            low_level_prompt=low_level_prompt,
            generate_subtask=decodes,
            state=state_arr,
            max_decoding_steps=int(max_decoding_steps),
            temperature=float(temperature),
            seed=int(seed),
            submitted=time.perf_counter(),
        )

    def _check_state(self, state) -> np.ndarray | None:
        if state is None:
            return None
        try:
            arr = np.asarray(state, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError("state must be a list of numbers") from None
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError(f"state must be a non-empty 1-D list of numbers, got shape {arr.shape}")
        if not np.isfinite(arr).all():
            raise ValueError("state contains NaN or infinity")
        expected = self.state_dim
        if expected is not None and arr.size != expected:
            raise ValueError(f"state has {arr.size} values, this robot's norm stats expect {expected}")
        if expected is None and arr.size > self.cfg.action_dim:
            raise ValueError(f"state has {arr.size} values, more than the model's {self.cfg.action_dim}")
        return arr.astype(np.float32)

    # ----------------------------------------------------------------- worker thread

    def _run(self) -> None:
        try:
            self._load_and_compile()
        except BaseException as e:  # the start() caller gets the failure
            log.exception("engine start failed")
            self._ready.set_exception(e)
            return
        self._ready.set_result(None)
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch, stop = [first], False
            deadline = time.perf_counter() + self._window_s
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
            self._process(batch)
            if stop:
                return

    def _load_and_compile(self) -> None:
        if self._compile_cache_dir is not None:
            current = jax.config.jax_compilation_cache_dir
            if current and current != str(self._compile_cache_dir):
                log.warning("JAX's compilation cache is process-wide and already at %s; keeping it", current)
            self._compile_cache_dir.mkdir(parents=True, exist_ok=True)
            jax.config.update("jax_compilation_cache_dir", current or str(self._compile_cache_dir))
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
            jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        devices = jax.devices()
        if self._gpu_id is not None and not 0 <= self._gpu_id < len(devices):
            raise ValueError(f"gpu_id {self._gpu_id} is out of range: {len(devices)} device(s) {devices}")
        self.device = devices[self._gpu_id or 0]
        dtype = jnp.dtype(self._param_dtype)
        start = time.perf_counter()
        if self._checkpoint_dir is not None:
            self._params = checkpoint.load_params(self._checkpoint_dir, self.cfg, dtype=dtype, device=self.device)
        else:
            log.info("no checkpoint given: random weights for %s (seed %d)", self.cfg.name, self._init_seed)
            with jax.default_device(self.device):
                self._params = params.init_params(self.cfg, seed=self._init_seed, dtype=dtype)
        self.startup_s["load"] = time.perf_counter() - start
        log.info("weights of %s on %s in %.1f s", self.cfg.name, self.device, self.startup_s["load"])
        self._compile_started = time.perf_counter()
        first, rest = self.buckets[:1], self.buckets[1:]
        self._compile_buckets(first)
        if rest and self._compile_in_background:
            # Serve at once with the smallest bucket; bigger batches split until theirs are compiled.
            log.info("serving while batch buckets %s compile in the background", list(rest))
            self._compiler = threading.Thread(target=self._compile_in_thread, args=(rest,), name="pi05-compile")
            self._compiler.start()
        else:
            self._compile_buckets(rest)

    def _compile_buckets(self, buckets: Sequence[int]) -> None:
        total = 2 * len(self.buckets)
        for b in buckets:
            for phase in ("subtask", "action"):
                t0 = time.perf_counter()
                executable = self._lower(phase, b).compile()
                self._compiled[(phase, b)] = executable
                log.info(
                    "compiled %s phase for batch %d (%d/%d) in %.2f s",
                    phase, b, len(self._compiled), total, time.perf_counter() - t0,
                )  # fmt: skip
        if len(self._compiled) == total:
            self.startup_s["compile"] = time.perf_counter() - self._compile_started
            log.info("all %d executables compiled in %.1f s", total, self.startup_s["compile"])
            self._all_compiled.set()

    def _compile_in_thread(self, buckets: Sequence[int]) -> None:
        try:
            self._compile_buckets(buckets)
        except Exception:  # the engine keeps serving with the buckets it has
            log.exception("compiling batch buckets %s failed; serving with %s", list(buckets), sorted(self._compiled))

    async def wait_until_compiled(self) -> None:
        """Returns once every batch bucket is compiled (start() returns after the smallest)."""
        await asyncio.to_thread(self._all_compiled.wait)

    def _specs(self, b: int):
        sharding = jax.sharding.SingleDeviceSharding(self.device)
        spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)  # noqa: E731
        c, size, n = len(self.cfg.image_keys), self.cfg.siglip.image_size, self.cfg.max_token_len
        obs = pi05.Observation(
            images=spec((b, c, size, size, 3), jnp.uint8),  # scaled to [-1, 1] on the device
            image_mask=spec((b, c), jnp.bool_),
            tokens=spec((b, n), jnp.int32),
            token_mask=spec((b, n), jnp.bool_),
        )
        return spec, obs

    def _lower(self, phase: str, b: int):
        spec, obs = self._specs(b)
        seeds = spec((b,), jnp.uint32)
        if phase == "subtask":
            return phases.subtask_phase.lower(
                self._params, obs, seeds, spec((b,), jnp.int32), spec((b,), jnp.float32),
                cfg=self.cfg, max_steps=self.max_decoding_steps_limit,
            )  # fmt: skip
        return phases.action_phase.lower(self._params, obs, seeds, spec((), jnp.int32), cfg=self.cfg)

    def _largest_ready_bucket(self) -> int:
        return max(b for b in self.buckets if ("subtask", b) in self._compiled and ("action", b) in self._compiled)

    def _process(self, batch: list[_Pending]) -> None:
        batch = [p for p in batch if p.future.set_running_or_notify_cancel()]
        size = self._largest_ready_bucket()
        stage1 = [p for p in batch if p.request.generate_subtask]
        for chunk in _chunks(stage1, size):
            self._run_chunk(chunk, self._prepare_subtask, self._run_subtask)
        stage2 = [p for p in batch if p.request.kind == "infer" and not p.future.done()]
        for chunk in _chunks(stage2, size):
            self._run_chunk(chunk, self._prepare_action, self._run_action)
        for p in batch:
            if not p.future.done():
                p.future.set_result(self._result(p))

    def _run_chunk(self, chunk: list[_Pending], prepare, run) -> None:
        """Runs one padded batch; a row whose input fails gets its own error, the others go on."""
        rows = []
        for p in chunk:
            try:
                rows.append((p, prepare(p)))
            except ValueError as e:
                p.future.set_exception(e)
        if not rows:
            return
        try:
            run(rows)
        except Exception as e:
            log.exception("model failure on a batch of %d", len(rows))
            for p, _ in rows:
                if not p.future.done():
                    p.future.set_exception(RuntimeError(f"inference failed inside the model: {e}"))

    def _observation(self, p: _Pending, text: str) -> tuple[np.ndarray, ...]:
        size = self.cfg.siglip.image_size
        c = len(self.cfg.image_keys)
        # uint8 to the device (a quarter of float32's bytes); a masked camera is black, nothing sees it.
        images = np.zeros((c, size, size, 3), np.uint8)
        mask = np.zeros(c, bool)
        for i, key in enumerate(self.cfg.image_keys):
            if key in p.request.images:
                images[i] = resize_with_pad(p.request.images[key], size)
                mask[i] = True
        tokens, token_mask = self.prompts.tokenize(text)
        return images, mask, tokens, token_mask

    def _normalized_state(self, p: _Pending) -> np.ndarray | None:
        s = p.request.state
        return None if s is None else self.normalizer.normalize_state(s)

    def _prepare_subtask(self, p: _Pending) -> tuple:
        r = p.request
        text = self.prompts.subtask_text(r.task, self._normalized_state(p))
        return (*self._observation(p, text), r.seed, r.max_decoding_steps, r.temperature)

    def _run_subtask(self, rows: list[tuple[_Pending, tuple]]) -> None:
        start = time.perf_counter()
        tokens, lengths = self._execute("subtask", rows)
        ms = (time.perf_counter() - start) * 1e3
        for i, (p, _) in enumerate(rows):
            ids = [int(t) for t in tokens[i, : lengths[i]]]
            p.subtask_tokens, p.subtask, p.subtask_ms = ids, self.tokenizer.decode(ids).strip(), ms

    def _prepare_action(self, p: _Pending) -> tuple:
        r = p.request
        if not r.generate_subtask and r.low_level_prompt is not None:
            p.subtask, p.subtask_tokens = r.low_level_prompt, self.tokenizer.encode(r.low_level_prompt)
        text = self.prompts.action_text(r.task, self._normalized_state(p), p.subtask)
        return (*self._observation(p, text), r.seed)

    def _run_action(self, rows: list[tuple[_Pending, tuple]]) -> None:
        start = time.perf_counter()
        actions = self._execute("action", rows)
        ms = (time.perf_counter() - start) * 1e3
        for i, (p, _) in enumerate(rows):
            robot = self.normalizer.unnormalize_actions(actions[i])
            p.actions, p.action_ms = robot[:, : self.robot_action_dim], ms

    def _execute(self, phase: str, rows) -> Any:
        n = len(rows)
        b = next(b for b in self.buckets if b >= n and (phase, b) in self._compiled)
        cols = list(zip(*(row for _, row in rows), strict=True))
        stacked = [np.stack(list(c) + [c[0]] * (b - n)) for c in cols]  # pad with copies of row 0
        put = lambda x: jax.device_put(x, self.device)  # noqa: E731
        obs = pi05.Observation(*(put(x) for x in stacked[:4]))
        seeds = put(stacked[4].astype(np.uint32))
        executable = self._compiled[(phase, b)]
        self.batch_counts[(phase, n)] += 1
        if phase == "subtask":
            limits = put(stacked[5].astype(np.int32))
            temps = put(stacked[6].astype(np.float32))
            tokens, lengths = executable(self._params, obs, seeds, limits, temps)
            return np.asarray(tokens), np.asarray(lengths)
        return np.asarray(executable(self._params, obs, seeds, put(np.int32(self.num_steps))))

    def _result(self, p: _Pending) -> dict[str, Any]:
        total_ms = (time.perf_counter() - p.request.submitted) * 1e3
        timing = {"total_ms": total_ms, "subtask_ms": p.subtask_ms}
        if p.request.kind == "subtask":
            return {"subtask": p.subtask, "subtask_tokens": p.subtask_tokens, "timing": timing}
        return {
            "actions": p.actions,
            "subtask": p.subtask,
            "subtask_tokens": p.subtask_tokens,
            "state": p.request.state,
            "timing": {**timing, "action_ms": p.action_ms},
        }


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]
