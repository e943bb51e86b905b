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
import atexit
import concurrent.futures
import logging
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from configs import get_model_config
from configs.model_config import ModelConfig
from policy import checkpoint
from policy.engine.executables import Executables
from policy.engine.host_prep import HostPrep
from policy.engine.images import Resizer
from policy.engine.model_files import ModelFiles, fetch_model_files
from policy.engine.scheduler import Scheduler, Ticket, fail
from policy.engine.settings import EngineSettings
from policy.engine.validation import RequestValidator, decodes_subtask
from policy.engine.worker import DeviceWorker
from policy.model import params
from policy.normalize import IDENTITY, Normalizer, checkpoint_normalizer, load_norm_stats
from policy.prompts import Prompts
from policy.request import (
    DeadlineExceeded,
    EngineBusy,
    EngineError,
    EngineStats,
    InferenceRequest,
    InferenceResult,
)
from policy.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

# Engines whose threads may still run; `_stop_engines_at_exit` waits for them.
_LIVE: weakref.WeakSet[AsyncPi05Inference] = weakref.WeakSet()


class AsyncPi05Inference:
    """Pi0.5 subtask generation and action prediction for many robots at once, on one device.

    `settings` (`EngineSettings`, checked when made) are the model, its files and the limits; nothing
    is read before `start()`, which fetches remote locations. `clock` (monotonic seconds) is
    injectable for tests. Call `await start()` (or use `async with`) before serving.
    """

    def __init__(self, settings: EngineSettings, *, clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.buckets = settings.buckets
        self._seed_rng = np.random.default_rng(settings.seed)
        self._clock = clock
        self._use_config(get_model_config(settings.config_name))
        # Set by `_load_host` at start (the tokenizer, norm stats and checkpoint may need a download).
        self.tokenizer = None
        self.prompts: Prompts | None = None
        self.normalizer: Normalizer | None = None
        self.robot_action_dim: int | None = None
        self.state_dim: int | None = None
        # Other names of the cameras (a LeRobot fine-tune's feature names -> model camera keys).
        self.camera_aliases: dict[str, str] = {}
        self._validator: RequestValidator | None = None
        self._prep: HostPrep | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(settings.host_workers, thread_name_prefix="pi05-host")
        self._scheduler = Scheduler(self._capacity, settings.batch_window_ms / 1e3, clock)
        self._executables: Executables | None = None
        self._worker: DeviceWorker | None = None
        self._thread: threading.Thread | None = None
        self._compiler: threading.Thread | None = None
        self._stopping = threading.Event()  # set by close() and at process exit: no new compile starts
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
            _LIVE.add(self)
            self._thread.start()
        await asyncio.wrap_future(self._ready)

    async def close(self) -> None:
        """Answers every request not yet running with `EngineError` ("unavailable"), lets the batch
        on the device finish, and stops the device thread and the host pool.

        It never waits for a compile (seconds to minutes for the full model): a server stopped
        while loading or compiling stops at once. No compile starts after it; the one in progress
        ends on its daemon thread, which the process waits for at exit (`_stop_engines_at_exit`)."""
        self._closing = True
        self._stopping.set()
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
            "checkpoint": str(self.settings.checkpoint_dir) if self.settings.checkpoint_dir else None,
            "image_keys": list(self.cfg.image_keys),
            "camera_aliases": dict(self.camera_aliases),
            "image_resolutions": [list(r) for r in self.resizer.declared],
            "input_resolution": [self.cfg.siglip.image_size] * 2,
            "action_horizon": self.cfg.action_horizon,
            "action_dim": self.robot_action_dim,
            "state_dim": self.state_dim,
            "trained_task": self.cfg.trained_task,
            "max_batch": self.settings.max_batch,
            "batch_buckets": list(self.buckets),
            "compiled_buckets": list(self._executables.ready_buckets()) if self._executables else [],
            "max_decoding_steps_limit": self.settings.max_decoding_steps_limit,
            "decode_segment_tokens": self.settings.decode_segment_tokens,
            "num_steps": self.num_steps,
            "rtc_method": self.settings.rtc_method,
            "deadline_s": self.settings.deadline_s,
            "max_queue": self.settings.max_queue,
            "in_flight": self._in_flight,
            "queued": self._scheduler.depth(),
            "failed_batches": self._worker.failed_batches if self._worker else 0,
            "nonfinite_rows": self._worker.nonfinite_rows if self._worker else 0,
            "healthy": self.healthy,
        }

    def stats(self) -> EngineStats:
        x = self._executables
        worker = self._worker
        return EngineStats(
            healthy=self.healthy,
            queued=self._scheduler.depth(),
            in_flight=self._in_flight,
            batches=dict(worker.batch_counts) if worker else {},
            compiles={p: (n, x.compile_seconds[p]) for p, n in list(x.compiles.items())} if x else {},
            failed_batches=worker.failed_batches if worker else 0,
            nonfinite_rows=worker.nonfinite_rows if worker else 0,
        )

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
            if self._in_flight >= self.settings.max_queue:
                raise EngineBusy(f"the engine has {self._in_flight} requests in flight, its limit; retry later")
            self._in_flight += 1
            seed = request.options.seed
            if seed is None:
                seed = int(self._seed_rng.integers(0, 2**31))
        now = self._clock()
        future: concurrent.futures.Future = concurrent.futures.Future()
        future.add_done_callback(self._release)
        deadline = request.deadline if request.deadline is not None else now + self.settings.deadline_s
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

    def _load_host(self) -> ModelFiles:
        """Tokenizer, norm stats and the host-side stages built on them; the local files. Remote
        locations are downloaded here, on the device thread, never in the constructor."""
        start = time.perf_counter()
        settings = self.settings
        files = fetch_model_files(self.cfg, settings)
        if files.torch is not None and files.torch.cfg != self.cfg:
            # A checkpoint that brings its own model config (LeRobot's `config.json`) is served with
            # it, whatever config the settings named.
            self._use_config(files.torch.cfg)
            log.info("serving the checkpoint's own config %s", self.cfg.name)
        if files.torch is not None:
            self.camera_aliases = dict(files.torch.camera_aliases)
        ckpt = files.checkpoint
        self.tokenizer = load_tokenizer(self.cfg, files.tokenizer)
        self.prompts = Prompts(self.cfg, self.tokenizer)
        if files.norm_stats is not None:
            self.normalizer = load_norm_stats(files.norm_stats)
        elif files.torch is not None:
            self.normalizer = files.torch.normalizer
        elif ckpt is not None:
            self.normalizer = checkpoint_normalizer(self.cfg, checkpoint.assets_dir(ckpt))
        else:
            self.normalizer = IDENTITY
        if ckpt is not None and self.normalizer is IDENTITY:
            log.warning("no norm stats for %s: state and actions pass unnormalized (--norm-stats)", self.cfg.name)
        self.robot_action_dim = self.normalizer.actions.dim if self.normalizer.actions else self.cfg.action_dim
        self.state_dim = self.normalizer.state.dim if self.normalizer.state else None
        self._prep = HostPrep(self.cfg, self.prompts, self.normalizer, self.resizer, self.camera_aliases)
        self._validator = RequestValidator(
            self.cfg,
            self.prompts,
            self.normalizer,
            self.resizer,
            settings.max_decoding_steps_limit,
            settings.max_image_side,
            self.camera_aliases,
        )
        self.startup_s["fetch"] = time.perf_counter() - start
        return files

    def _use_config(self, cfg: ModelConfig) -> None:
        """Serves `cfg`: its sizes, sampling steps, dtype and input resolution (unless the settings
        name their own steps or dtype)."""
        self.cfg = cfg
        self.num_steps = self.settings.num_steps or cfg.num_steps
        self._param_dtype = self.settings.param_dtype or cfg.dtype
        s = self.settings
        self.resizer = Resizer(cfg.siglip.image_size, s.image_resolutions, s.max_image_resolutions, clock=self._clock)

    def _load_and_compile(self) -> None:
        files = self._load_host()
        ckpt = files.checkpoint
        devices, gpu_id, seed = jax.devices(), self.settings.gpu_id, self.settings.seed
        if gpu_id is not None and gpu_id >= len(devices):
            raise ValueError(f"gpu_id {gpu_id} is out of range: {len(devices)} device(s) {devices}")
        self.device = devices[gpu_id or 0]
        dtype = jnp.dtype(self._param_dtype)
        start = time.perf_counter()
        if files.torch is not None:
            weights = files.torch.load_params(dtype, self.device)
        elif ckpt is not None:
            weights = checkpoint.load_params(ckpt, self.cfg, dtype=dtype, device=self.device)
        else:
            log.info("no checkpoint given: random weights for %s (seed %d)", self.cfg.name, seed)
            with jax.default_device(self.device):
                weights = params.init_params(self.cfg, seed=seed, dtype=dtype)
        self.startup_s["load"] = time.perf_counter() - start
        log.info("weights of %s on %s in %.1f s", self.cfg.name, self.device, self.startup_s["load"])
        start = time.perf_counter()
        self._executables = Executables(self.cfg, weights, self.device, self.settings)
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
        self._executables.compile(first, self._stopping)
        self.startup_s["compile_first"] = time.perf_counter() - start
        if self._stopping.is_set():
            raise EngineError("the engine was closed while it started", code="unavailable")
        if rest and self.settings.compile_in_background:
            # Serve at once with the smallest bucket; bigger batches split until theirs are compiled.
            log.info("serving while batch buckets %s compile in the background", list(rest))
            self._compiler = threading.Thread(target=self._compile_rest, args=(rest,), name="pi05-compile", daemon=True)
            self._compiler.start()
        else:
            self._executables.compile(rest, self._stopping)
            self._executables.compiling_done.set()

    def _compile_rest(self, buckets: Sequence[int]) -> None:
        try:
            self._executables.compile(buckets, self._stopping)
        except Exception:  # the engine keeps serving with the buckets it has
            log.exception("compiling batch buckets %s failed; serving with the buckets compiled so far", list(buckets))
        finally:
            self._executables.compiling_done.set()
        self._scheduler.wake()  # a queue waiting for a fuller batch may go now

    def _stop_threads(self) -> None:
        """No new batch or compile starts; returns once the one in progress has ended."""
        self._stopping.set()
        self._scheduler.close(EngineError("the process is exiting", code="unavailable"))
        for thread in (self._thread, self._compiler):  # the device thread may start the compiler: first
            if thread is not None:
                thread.join()


@atexit.register
def _stop_engines_at_exit() -> None:
    """Waits at process exit for the compile or batch each engine has in progress, starting no other.

    The engine's threads are daemons, so an exit never waits for a queue of compiles. But one still
    inside XLA when the interpreter finalizes is killed on its way back into Python, and that
    unwinding through XLA's C++ aborts the process ("terminate called after throwing an instance of
    ''", exit code 134). atexit runs before that point (and, registered after JAX's import, before
    JAX's own exit hooks). A server that must stop at once leaves with `os._exit`, skipping this."""
    for engine in list(_LIVE):
        engine._stop_threads()
