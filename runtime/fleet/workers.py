"""The front host's policy worker processes: one per GPU (`--gpu-ids`) or N on the CPU (`--workers`).

Each worker is `python -m runtime.policy_server --join <broker>` with the front host's own model and
serving flags (the front-only ones left out), its device chosen by environment before JAX starts:
`CUDA_VISIBLE_DEVICES=<id>` for a GPU worker; for a CPU worker one XLA thread pool of one thread and
the process pinned to one core (`--cpus`), so N workers on a small machine share it predictably
instead of each starting a thread per core. A worker that exits is started again, with a backoff
that doubles while it keeps failing (a worker that ran a while starts again at once); it joins the
broker again, and the broker places robots on it like on any new worker. Workers die with the front
host (`PR_SET_PDEATHSIG`, armed by `--die-with-parent`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import sys
import time
from collections.abc import Mapping

from runtime import child_process

log = logging.getLogger("runtime.fleet.workers")

STOP_TIMEOUT_S = 5.0
MAX_BACKOFF_S = 10.0
STABLE_S = 30.0  # a worker that ran this long is restarted without delay
CPU_XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    name: str
    env: dict[str, str]
    argv: tuple[str, ...]  # flags of this worker alone (device pinning)


def cpu_env(environ: Mapping[str, str]) -> dict[str, str]:
    """What a CPU worker sets in the environment `environ` it starts from: JAX on the CPU with one
    XLA thread, after whatever `XLA_FLAGS` the operator set."""
    return {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"{environ.get('XLA_FLAGS', '')} {CPU_XLA_FLAGS}".strip()}


def worker_specs(workers: int, gpu_ids: tuple[int, ...]) -> list[WorkerSpec]:
    """One spec per GPU id, or `workers` CPU workers pinned round-robin to this host's cores."""
    if gpu_ids:
        return [WorkerSpec(f"gpu{g}", {"CUDA_VISIBLE_DEVICES": str(g)}, ()) for g in gpu_ids]
    cores = sorted(os.sched_getaffinity(0))
    env = cpu_env(os.environ)
    return [WorkerSpec(f"cpu{i}", env, ("--cpus", str(cores[i % len(cores)]))) for i in range(workers)]


class WorkerProcess:
    """One supervised worker process (`start`, then it is restarted until `close`)."""

    def __init__(self, spec: WorkerSpec, argv: list[str]):
        self.spec = spec
        self._argv = [
            sys.executable, "-m", "runtime.policy_server", *argv,
            "--worker-name", spec.name, *spec.argv, "--die-with-parent",
        ]  # fmt: skip
        self._proc: asyncio.subprocess.Process | None = None
        self._watcher: asyncio.Task | None = None
        self._closing = False
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    async def start(self) -> None:
        self._watcher = asyncio.create_task(self._run(), name=f"worker-{self.spec.name}")

    async def _run(self) -> None:
        failures = 0
        while not self._closing:
            started = time.monotonic()
            self._proc = await asyncio.create_subprocess_exec(*self._argv, env={**os.environ, **self.spec.env})
            code = await self._proc.wait()
            if self._closing:
                return
            failures = 1 if time.monotonic() - started > STABLE_S else failures + 1
            delay = 0.0 if failures == 1 else min(MAX_BACKOFF_S, 0.25 * 2 ** (failures - 2))
            self.restarts += 1
            log.error("policy worker %s exited with %s; starting it again in %.2f s", self.spec.name, code, delay)
            await asyncio.sleep(delay)

    async def close(self) -> None:
        self._closing = True
        await child_process.stop(self._proc, STOP_TIMEOUT_S)
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
