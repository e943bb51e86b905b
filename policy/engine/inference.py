"""`AsyncPi05Inference`: two-stage Pi0.5 inference behind an asyncio API that batches robots.

A request goes through four hands, each in its own module:

- `check` (`validation.py`): synchronous, cheap, `ValueError` naming the field;
- the host pool (`host_prep.py`): images resized and prompts tokenized once, into a typed `Row`,
  while the device runs the previous batch;
- the scheduler (`scheduler.py`): per-phase queues, actions first, subtask decoding in segments;
- the device thread (`worker.py`) running AOT executables (`executables.py`).

The event loop only checks, admits and awaits. Every request has a deadline (`DeadlineExceeded`),
the number in flight is bounded (`EngineBusy` at once), a failing batch fails only its own requests,
and `close()` answers whatever is still queued. Process-wide JAX settings are not made here:
`policy.engine.jax_setup.configure` is the serving process's call.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from configs import DEFAULT_MODEL, get_model_config
from policy import checkpoint, download
from policy.engine.executables import Executables
from policy.engine.host_prep import HostPrep
from policy.engine.images import DEFAULT_RESOLUTIONS, Resizer
from policy.engine.scheduler import Scheduler, Ticket, fail
from policy.engine.validation import RequestValidator, decodes_subtask
from policy.engine.worker import DeviceWorker
from policy.model import params, rtc
from policy.normalize import IDENTITY, Normalizer, checkpoint_normalizer, load_norm_stats
from policy.prompts import Prompts
from policy.request import DeadlineExceeded, EngineBusy, EngineError, InferenceRequest, InferenceResult
from policy.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


class AsyncPi05Inference:
    """Pi0.5 subtask generation and action prediction for many robots at once, on one device.

    `checkpoint_dir` is an openpi checkpoint directory (or its `params/`), local or an fsspec URL such
    as `gs://openpi-assets/checkpoints/pi05_droid` (fetched into the download cache at start); without
    one the model gets random weights (the embedded default). `norm_stats` is openpi's
    `norm_stats.json` or a checkpoint's `assets/<asset_id>/` folder (path or URL); without it they come
    from the checkpoint's `assets/<config asset id>/`, and state and actions pass unnormalized only
    for a config without an asset id or without a checkpoint. `tokenizer_path` (path or URL) defaults
    to the shipped tokenizer, or PaliGemma's, fetched. Nothing is read before `start()`.
    `gpu_id` picks the device. `deadline_s` is the deadline of a request that carries none;
    `max_queue` bounds the requests in flight; `decode_segment_tokens` is how many subtask tokens
    run between two chances for an action batch; `image_resolutions` are the camera resolutions
    whose resize compiles at start, `max_image_resolutions` how many stay compiled in all (another
    evicts the least recently used undeclared one; new ones compile at a bounded rate:
    `policy.engine.images.Resizer`). `rtc_method` is how real-time chunking guides the flow
    (`policy.model.rtc`): "vjp", the exact vector-Jacobian product through the action expert (a backward
    pass per step, only in batches with a guided row), or "identity", the cheaper approximation;
    compiled once, for every request. `clock` (monotonic seconds) is injectable for tests.
    Call `await start()` (or use `async with`) before serving.
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
        decode_segment_tokens: int = 4,
        num_steps: int | None = None,
        deadline_s: float = 5.0,
        max_queue: int = 64,
        host_workers: int = 2,
        image_resolutions: Iterable[tuple[int, int]] = DEFAULT_RESOLUTIONS,
        max_image_resolutions: int = 16,
        max_image_side: int = 4096,
        compile_in_background: bool = True,
        rtc_method: rtc.Method = "vjp",
        seed: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.cfg = get_model_config(config_name)
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        for name, value in (("deadline_s", deadline_s), ("max_queue", max_queue), ("host_workers", host_workers)):
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if not 1 <= decode_segment_tokens:
            raise ValueError(f"decode_segment_tokens must be >= 1, got {decode_segment_tokens}")
        if rtc_method not in rtc.METHODS:
            raise ValueError(f"rtc_method must be one of {rtc.METHODS}, got {rtc_method!r}")
        self.rtc_method = rtc_method
        self.buckets: tuple[int, ...] = tuple(sorted({b for b in batch_buckets if b <= max_batch} | {max_batch}))
        self.max_batch = max_batch
        self.max_decoding_steps_limit = max_decoding_steps_limit
        self.decode_segment_tokens = decode_segment_tokens
        self.num_steps = num_steps or self.cfg.num_steps
        self.deadline_s = deadline_s
        self.max_queue = max_queue
        self._gpu_id = gpu_id
        self._checkpoint = checkpoint_dir  # a path or a URL: fetched and read on the device thread
        self._tokenizer_path = tokenizer_path
        self._norm_stats = norm_stats
        self._param_dtype = param_dtype or self.cfg.dtype
        self._compile_in_background = compile_in_background
        self._init_seed = seed
        self._seed_rng = np.random.default_rng(seed)
        self._clock = clock
        self.resizer = Resizer(self.cfg.siglip.image_size, image_resolutions, max_image_resolutions, clock=clock)
        self._max_image_side = max_image_side
        # Set by `_load_host` at start (the tokenizer, norm stats and checkpoint may need a download).
        self.tokenizer = None
        self.prompts: Prompts | None = None
        self.normalizer: Normalizer | None = None
        self.robot_action_dim: int | None = None
        self.state_dim: int | None = None
        self._validator: RequestValidator | None = None
        self._prep: HostPrep | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(host_workers, thread_name_prefix="pi05-host")
        self._scheduler = Scheduler(self._capacity, batch_window_ms / 1e3, clock)
        self._executables: Executables | None = None
        self._worker: DeviceWorker | None = None
        self._thread: threading.Thread | None = None
        self._compiler: threading.Thread | None = None
        self._ready: concurrent.futures.Future = concurrent.futures.Future()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._closing = False
        self._fatal: BaseException | None = None
        self.device: jax.Device | None = None
        self.startup_s: dict[str, float] = {}

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Loads the weights and compiles the smallest bucket on the device thread, then serves.

        The other buckets compile on a background thread (`compile_in_background`, the default), so
        a server answers within seconds; until a bucket is ready, larger batches are split."""
        if self._closing:
            raise EngineError("the engine is closed", code="unavailable")
        if self._thread is None:
            self._thread = threading.Thread(target=self._device_thread, name="pi05-engine", daemon=True)
            self._thread.start()
        await asyncio.wrap_future(self._ready)

    async def close(self) -> None:
        """Answers every request not yet running with `EngineError` ("unavailable"), lets the batch
        on the device finish, and stops the device thread and the host pool.

        It never waits for a compile (seconds to minutes for the full model): a server stopped
        while loading or compiling stops at once, and the compile threads, daemons, end with it."""
        self._closing = True
        self._scheduler.close(EngineError("the engine is closed", code="unavailable"))
        if self._thread is not None and self._ready.done():
            await asyncio.to_thread(self._thread.join)
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def __aenter__(self) -> AsyncPi05Inference:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def wait_until_compiled(self) -> None:
        """Returns once every batch bucket is compiled (start() returns after the smallest)."""
        await asyncio.wrap_future(self._ready)
        await asyncio.to_thread(self._executables.compiling_done.wait)

    @property
    def healthy(self) -> bool:
        """False before start, after close, or once the device thread has died."""
        return (
            self._ready.done()
            and self._ready.exception() is None
            and self._thread is not None
            and self._thread.is_alive()
            and self._fatal is None
            and not self._closing
        )

    def info(self) -> dict[str, Any]:
        """What a health check reports about the model and the engine."""
        return {
            "config": self.cfg.name,
            "dtype": self._param_dtype,
            "device": str(self.device) if self.device is not None else None,
            "checkpoint": str(self._checkpoint) if self._checkpoint else None,
            "image_keys": list(self.cfg.image_keys),
            "image_resolutions": [list(r) for r in self.resizer.declared],
            "action_horizon": self.cfg.action_horizon,
            "action_dim": self.robot_action_dim,
            "state_dim": self.state_dim,
            "max_batch": self.max_batch,
            "batch_buckets": list(self.buckets),
            "compiled_buckets": list(self._executables.ready_buckets()) if self._executables else [],
            "max_decoding_steps_limit": self.max_decoding_steps_limit,
            "decode_segment_tokens": self.decode_segment_tokens,
            "num_steps": self.num_steps,
            "rtc_method": self.rtc_method,
            "deadline_s": self.deadline_s,
            "max_queue": self.max_queue,
            "in_flight": self._in_flight,
            "queued": self._scheduler.depth(),
            "failed_batches": self._worker.failed_batches if self._worker else 0,
            "nonfinite_rows": self._worker.nonfinite_rows if self._worker else 0,
            "healthy": self.healthy,
        }

    @property
    def batch_counts(self):
        """(phase, real rows) -> executed batches ("subtask" counts decoding starts)."""
        return self._worker.batch_counts if self._worker else {}

    @property
    def executable_runs(self):
        """(executable, bucket) -> executions."""
        return self._executables.runs if self._executables else {}

    # ----------------------------------------------------------------- public API

    def check(self, request: InferenceRequest) -> None:
        """Cheap, synchronous validation; raises `ValueError` naming the field. No device work."""
        self._started().check(request)

    async def prepare_images(self, images: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Each camera resized to the model's input (uint8) on the host pool: a stored observation
        stays small, and preparing it again (or submitting it) leaves the same numbers."""
        self._started().check_images(images)
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._prep.images, images)

    async def submit(self, request: InferenceRequest) -> InferenceResult:
        """Runs the request; raises `ValueError` (bad input), `EngineBusy`, `DeadlineExceeded` or
        `EngineError` ("unavailable" when not serving, "internal" when the model failed)."""
        self.check(request)
        if self._fatal is not None:
            raise EngineError(f"the engine's device thread died: {self._fatal}", code="internal")
        if not self.healthy:
            raise EngineError("the engine is not serving", code="unavailable")
        ticket = self._admit(request)
        self._scheduler.expect(ticket)
        self._pool.submit(self._prepare, ticket)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(ticket.future), max(0.0, ticket.deadline - self._clock()))
        except TimeoutError:
            ticket.abandoned = True
            raise DeadlineExceeded(
                f"no result within the request's deadline ({(self._clock() - ticket.submitted) * 1e3:.0f} ms)"
            ) from None

    def _started(self) -> RequestValidator:
        if self._validator is None:
            raise EngineError("the engine is not started", code="unavailable")
        return self._validator

    def _admit(self, request: InferenceRequest) -> Ticket:
        with self._lock:
            if self._in_flight >= self.max_queue:
                raise EngineBusy(f"the engine has {self._in_flight} requests in flight, its limit; retry later")
            self._in_flight += 1
            seed = request.options.seed
            if seed is None:
                seed = int(self._seed_rng.integers(0, 2**31))
        now = self._clock()
        future: concurrent.futures.Future = concurrent.futures.Future()
        future.add_done_callback(self._release)
        deadline = request.deadline if request.deadline is not None else now + self.deadline_s
        return Ticket(request, int(seed), deadline, now, future, decodes_subtask(request))

    def _release(self, _future: concurrent.futures.Future) -> None:
        with self._lock:
            self._in_flight -= 1

    def _prepare(self, ticket: Ticket) -> None:
        """On the host pool: the ticket's `Row`, then into the scheduler's queues."""
        if not ticket.live(self._clock()):
            self._scheduler.unexpect(ticket)
            return
        try:
            self._prep.prepare(ticket)
        except ValueError as e:
            fail(ticket, e)
            self._scheduler.unexpect(ticket)
            return
        except Exception as e:
            # The message may carry a client's text: quoted, so that it cannot forge log lines, and
            # the traceback's frames without it.
            log.error("preparing a request failed: %s: %r", type(e).__name__, str(e))
            log.debug("where it failed:\n%s", "".join(traceback.format_tb(e.__traceback__)).rstrip())
            fail(ticket, EngineError(f"preparing the request failed: {type(e).__name__}: {e}"))
            self._scheduler.unexpect(ticket)
            return
        self._scheduler.put(ticket)

    # ----------------------------------------------------------------- device thread

    def _capacity(self) -> int:
        return self._executables.capacity() if self._executables else 0

    def _device_thread(self) -> None:
        try:
            self._load_and_compile()
        except BaseException as e:  # the start() caller gets the failure and reports it in one line
            log.debug("engine start failed", exc_info=True)
            self._ready.set_exception(e)
            return
        self._ready.set_result(None)
        try:
            self._worker.run()
        except BaseException as e:  # not a batch failure: the scheduling itself broke
            log.exception("the engine's device thread died; the engine is unhealthy")
            self._fatal = e
            self._scheduler.close(EngineError(f"the engine's device thread died: {e}", code="internal"))

    def _load_host(self) -> Path | None:
        """Tokenizer, norm stats and the host-side stages built on them; the local checkpoint path.
        Remote locations are downloaded here, on the device thread, never in the constructor."""
        start = time.perf_counter()
        ckpt = download.maybe_download(self._checkpoint) if self._checkpoint else None
        self.tokenizer = load_tokenizer(self.cfg, self._tokenizer_path, fetch=True)
        self.prompts = Prompts(self.cfg, self.tokenizer)
        if self._norm_stats is not None:
            self.normalizer = load_norm_stats(self._norm_stats)
        elif ckpt is not None:
            self.normalizer = checkpoint_normalizer(self.cfg, checkpoint.assets_dir(ckpt))
        else:
            self.normalizer = IDENTITY
        if ckpt is not None and self.normalizer is IDENTITY:
            log.warning("no norm stats for %s: state and actions pass unnormalized (--norm-stats)", self.cfg.name)
        self.robot_action_dim = self.normalizer.actions.dim if self.normalizer.actions else self.cfg.action_dim
        self.state_dim = self.normalizer.state.dim if self.normalizer.state else None
        self._prep = HostPrep(self.cfg, self.prompts, self.normalizer, self.resizer)
        self._validator = RequestValidator(
            self.cfg, self.prompts, self.normalizer, self.resizer, self.max_decoding_steps_limit, self._max_image_side
        )
        self.startup_s["fetch"] = time.perf_counter() - start
        return ckpt

    def _load_and_compile(self) -> None:
        ckpt = self._load_host()
        devices = jax.devices()
        if self._gpu_id is not None and not 0 <= self._gpu_id < len(devices):
            raise ValueError(f"gpu_id {self._gpu_id} is out of range: {len(devices)} device(s) {devices}")
        self.device = devices[self._gpu_id or 0]
        dtype = jnp.dtype(self._param_dtype)
        start = time.perf_counter()
        if ckpt is not None:
            weights = checkpoint.load_params(ckpt, self.cfg, dtype=dtype, device=self.device)
        else:
            log.info("no checkpoint given: random weights for %s (seed %d)", self.cfg.name, self._init_seed)
            with jax.default_device(self.device):
                weights = params.init_params(self.cfg, seed=self._init_seed, dtype=dtype)
        self.startup_s["load"] = time.perf_counter() - start
        log.info("weights of %s on %s in %.1f s", self.cfg.name, self.device, self.startup_s["load"])
        start = time.perf_counter()
        self._executables = Executables(
            self.cfg,
            weights,
            self.device,
            self.buckets,
            self.max_decoding_steps_limit,
            self.decode_segment_tokens,
            self.rtc_method,
        )
        self._worker = DeviceWorker(
            self._executables,
            self._scheduler,
            self._prep,
            self.normalizer,
            self.robot_action_dim,
            self.num_steps,
            self._clock,
        )
        self.resizer.warm()
        first, rest = self.buckets[:1], self.buckets[1:]
        self._executables.compile(first)
        self.startup_s["compile_first"] = time.perf_counter() - start
        if rest and self._compile_in_background:
            # Serve at once with the smallest bucket; bigger batches split until theirs are compiled.
            log.info("serving while batch buckets %s compile in the background", list(rest))
            self._compiler = threading.Thread(target=self._compile_rest, args=(rest,), name="pi05-compile", daemon=True)
            self._compiler.start()
        else:
            self._executables.compile(rest)
            self._executables.compiling_done.set()

    def _compile_rest(self, buckets: Sequence[int]) -> None:
        try:
            self._executables.compile(buckets)
        except Exception:  # the engine keeps serving with the buckets it has
            log.exception("compiling batch buckets %s failed; serving with the buckets compiled so far", list(buckets))
        finally:
            self._executables.compiling_done.set()
        self._scheduler.wake()  # a queue waiting for a fuller batch may go now
