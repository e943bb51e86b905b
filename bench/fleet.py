"""Many robots through one broker: chunks per second and latency for 1, 2 and 4 workers, and CURVE's cost.

As deployed for many hosts: `python -m runtime.broker` in a process of its own, each worker a process
that joins it over TCP (`--join`), pinned to one core (`--cpus`; the cores are shared round-robin when
there are more workers than cores), and the robots in this process, each an `AsyncPolicyClient` that
asks for its next chunk as soon as the last one arrives (closed loop, one 224x224 camera and 8 state
values per request). Throughput is the chunks answered in a fixed window over its length; latency is
each request's round trip. Ratios are against 1 worker with the same robots, in the same run.

The backend (`--backend`):
- `device` (default): the fixed reply behind a simulated accelerator: a worker serves up to
  `--max-batch` requests at once and each batch takes `--device-ms` whatever its size, as a GPU's
  batch time is nearly flat at small batches. It costs no CPU, so on a 2-core machine the ratios show
  what the routing does (robots spread, batches filled, broker overhead), not how CPU work shares cores.
- `model`: the real model (`--config`, random weights) on the CPU, one core and one XLA thread per
  worker: on a 2-core machine more than 2 workers only share the same two cores.
- `fixed`: the fixed reply alone (no device time): the broker's own overhead.

CURVE's cost: one robot's round trips, CURVE off and on, against a single server and against a fleet of
one worker (`--workers 1`), all four running at once and taking turns in short rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.report import percentiles_ms, write_section
from policy.request import InferenceRequest, InferenceResult
from runtime.fleet.workers import cpu_env
from runtime.policy_server.fixed_backend import FixedBackend
from tests.support.ports import free_local_ports
from tests.support.server_process import REPO, ServerProcess
from transport.zmq_async_client import AsyncPolicyClient
from transport.zmq_client import PolicyClient

IMAGES = {"base_0_rgb": np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)}
STATE = np.zeros(8, np.float32)
PROMPT = "pick up the cup"
START_TIMEOUT_S = 900.0
NOTES = (
    "Reading it: a worker serves its robots in batches, so the chunk rate grows with the workers as long"
    " as there are more robots than one worker batches at once (32 robots: 2.0x and 4.0x are the ideal);"
    " 8 robots fill two workers' batches, so 4 workers add nothing to 2. Every worker had the same number"
    " of robots (least-loaded placement). The broker's own cost is the fleet rows of the CURVE table: one"
    " more hop, about half a millisecond for a 224x224 image on this machine.",
    "",
    "The batch window (last row): with the engine's default of 3 ms, robots answered in one batch whose"
    " next requests reach the worker more than 3 ms apart (worker processes, the broker and the robots on"
    " 2 cores) split into two half-full batches and stay split, each batch's robots asking while the other"
    " batch runs: 2 workers then serve at the rate of one. Hence the longer window in the other rows; on a"
    " GPU host with a core per worker the default may do, but it is the first thing to check when a"
    " fleet's rate stays at one worker's.",
    "",
    "A multi-GPU run (not done here: no GPU lent) needs: one GPU per worker (`--gpu-ids 0,1,2,3` on one"
    " host, or `--join` from each GPU host; each worker holds the whole model, ~7 GB in bfloat16 for"
    " `pi05`, plus its KV caches), a CPU core or two per worker for host preparation (image resize,"
    " tokenizing) and one for the broker, the compile cache shared between workers"
    " (`~/.cache/pi05-runtime/jax`, so only the first worker compiles), robots at least `max_batch` times"
    " the workers to see the ratio, and network for the images (150 KB per 224x224 camera per request:"
    " 32 robots at 10 chunks/s with 3 cameras are ~150 MB/s through the broker). Then"
    " `python -m bench.fleet --backend model --config pi05 --gpu-ids 0 1 2 3 --robots 16 64`.",
)


class SimulatedDevice(FixedBackend):
    """The fixed backend's checks and reply, with an accelerator's timing: requests queue for one
    device that takes up to `max_batch` of them at a time, `device_s` per batch, after waiting
    `window_s` for a batch to fill (the engine's `--batch-window-ms`)."""

    def __init__(self, device_s: float, max_batch: int, window_s: float = 0.003):
        super().__init__()
        self.device_s = device_s
        self.max_batch = max_batch
        self.window_s = window_s
        self._waiting: list[asyncio.Future] = []
        self._wake: asyncio.Event | None = None
        self._device: asyncio.Task | None = None
        self.batches = 0

    async def submit(self, request: InferenceRequest) -> InferenceResult:
        if self._device is None:
            self._wake = asyncio.Event()
            self._device = asyncio.create_task(self._run())
        assert self._wake is not None
        done = asyncio.get_running_loop().create_future()
        self._waiting.append(done)
        self._wake.set()
        await done
        return await super().submit(request)

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(self.window_s)
            while self._waiting:
                batch, self._waiting = self._waiting[: self.max_batch], self._waiting[self.max_batch :]
                await asyncio.sleep(self.device_s)
                self.batches += 1
                for done in batch:
                    if not done.done():
                        done.set_result(None)


def serve_worker(argv: list[str], device_ms: float, max_batch: int, window_ms: float) -> None:
    """A worker process with the simulated device (`--serve-worker`)."""
    import logging

    from runtime.policy_server.flags import parse_args
    from runtime.policy_server.main import serve

    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format=f"%(asctime)s %(levelname)s %(name)s@{args.worker_name}: %(message)s"
    )
    asyncio.run(serve(args, backend=SimulatedDevice(device_ms / 1e3, max_batch, window_ms / 1e3)))


# ---------------------------------------------------------------------- processes


class Fleet:
    """`python -m runtime.broker` and its workers, each in a process of its own."""

    def __init__(
        self, backend: str, config: str, device_ms: float, max_batch: int, worker_curve: tuple[Path, Path] | None = None
    ):
        """`worker_curve`: the broker's workers'-side secret file and allow-list folder (workers then
        join with keys, as Ray replicas always do)."""
        self.backend, self.config, self.device_ms, self.max_batch = backend, config, device_ms, max_batch
        router, self.worker_port, worker_pub = free_local_ports(3)
        self.router = f"tcp://127.0.0.1:{router}"
        self._env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        curve = (
            ["--worker-curve-secret", str(worker_curve[0]), "--worker-curve-clients", str(worker_curve[1])]
            if (worker_curve)
            else []
        )
        self.broker = subprocess.Popen(
            [sys.executable, "-m", "runtime.broker", "--router-port", str(router), "--pub-port", "0",
             "--worker-port", str(self.worker_port), "--worker-pub-port", str(worker_pub), "--log-level", "WARNING",
             *curve],
            cwd=REPO, env=self._env,
        )  # fmt: skip
        self.workers: list[subprocess.Popen] = []
        self._probe = PolicyClient(self.router, "bench-probe", timeout_s=10)

    def worker_command(self, window_ms: float, *flags: str) -> list[str]:
        """A worker's command line (after the interpreter), joining this broker: the simulated device
        (`--serve-worker`) or the server (`--fixed-reply` or the model), with `flags` of its own."""
        flags = ("--join", f"tcp://127.0.0.1:{self.worker_port}", "--max-batch", str(self.max_batch),
                 "--batch-window-ms", str(window_ms), "--log-level", "WARNING", *flags)  # fmt: skip
        if self.backend == "device":
            return ["-m", "bench.fleet", "--serve-worker", "--device-ms", str(self.device_ms), "--max-batch",
                    str(self.max_batch), "--batch-window-ms", str(window_ms), "--", *flags]  # fmt: skip
        # The model's first requests wait for its compiles: a deadline that never cuts them short.
        model = ["--fixed-reply"] if self.backend == "fixed" else ["--config", self.config, "--deadline", "600"]
        return ["-m", "runtime.policy_server", *flags, *model]

    def start_workers(
        self, count: int, window_ms: float, gpu_ids: tuple[int, ...] = (), keys: list[tuple[Path, Path]] | None = None
    ) -> None:
        """`count` workers, each on one core (round-robin), or each on one of `gpu_ids`; with `keys`
        (the broker's public key and each worker's secret file), over CURVE."""
        cores = sorted(os.sched_getaffinity(0))
        for i in range(count):
            flags = ["--worker-name", f"w{i}", "--die-with-parent"]
            if keys:
                flags += ["--join-curve-server-key", str(keys[i][0]), "--join-curve-key", str(keys[i][1])]
            env = dict(self._env)
            if gpu_ids:
                env["CUDA_VISIBLE_DEVICES"] = str(gpu_ids[i])
            else:
                flags += ["--cpus", str(cores[i % len(cores)])]
                if self.backend == "model":
                    env.update(cpu_env(env))
            command = self.worker_command(window_ms, *flags)
            self.workers.append(subprocess.Popen([sys.executable, *command], cwd=REPO, env=env))
        self.wait_joined(count)

    def wait_joined(self, count: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while len(self.placement()) < count:
            if time.monotonic() > deadline or any(w.poll() is not None for w in self.workers):
                raise RuntimeError(f"{count} workers did not join the broker")
            time.sleep(0.2)

    def placement(self) -> dict[str, int]:
        return {w["name"]: w["robots"] for w in self._probe.ping()["broker"]["workers"]}

    def stop_workers(self) -> None:
        for w in self.workers:
            w.send_signal(signal.SIGINT)
        for w in self.workers:
            try:
                w.wait(30)
            except subprocess.TimeoutExpired:
                w.kill()
                w.wait()
        self.workers = []
        while self.placement():  # every worker said DISCONNECT
            time.sleep(0.05)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stop_workers()
        self._probe.close()
        self.broker.send_signal(signal.SIGINT)
        try:
            self.broker.wait(10)
        except subprocess.TimeoutExpired:
            self.broker.kill()


# ---------------------------------------------------------------------- robots


async def run_robots(
    endpoint: str, names: list[str], seconds: float, placement: Callable[[], dict[str, int]]
) -> tuple[int, list[float], float, dict[str, int]]:
    """(chunks, latencies in s, window in s, robots per worker): every robot asks for chunks back to back."""
    clients = [AsyncPolicyClient(endpoint, name, timeout_s=120, retries=0) for name in names]
    for c in clients:
        await c.connect()
    try:
        # One warm-up request each: robots are placed, sessions made, images' resize paths warm.
        await asyncio.gather(*(c.infer(IMAGES, PROMPT, STATE, generate_subtask=False) for c in clients))
        latencies: list[float] = []
        loop = asyncio.get_running_loop()
        start = loop.time()
        end = start + seconds

        async def robot(c: AsyncPolicyClient) -> int:
            served = 0
            while loop.time() < end:
                sent = time.perf_counter()
                await c.infer(IMAGES, PROMPT, STATE, generate_subtask=False)
                latencies.append(time.perf_counter() - sent)
                served += 1
            return served

        served = sum(await asyncio.gather(*(robot(c) for c in clients)))
        window = loop.time() - start
        placed = placement()
        await asyncio.gather(*(c.bye() for c in clients))
        return served, latencies, window, placed
    finally:
        for c in clients:
            await c.close()


def throughput(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (workers, robots) cell at `--batch-window-ms`; then, for comparison, 2 workers and the
    fewest robots at the engine's default window (3 ms)."""
    cells = [(w, args.batch_window_ms, args.robots) for w in args.workers]
    if args.backend == "device" and args.batch_window_ms != 3.0 and 2 in args.workers:
        cells.append((2, 3.0, [min(args.robots)]))
    rows = []
    fleet = Fleet(args.backend, args.config, args.device_ms, args.max_batch)
    try:
        for workers, window_ms, robot_counts in cells:
            fleet.start_workers(workers, window_ms, tuple(args.gpu_ids[:workers]))
            for robots in robot_counts:
                names = [f"w{workers}-r{robots}-b{window_ms:g}-{i}" for i in range(robots)]
                served, latencies, window, placed = asyncio.run(
                    run_robots(fleet.router, names, args.seconds, fleet.placement)
                )
                p50, p99 = percentiles_ms(latencies)
                rows.append({
                    "workers": workers, "robots": robots, "window_ms": window_ms, "chunks_per_s": served / window,
                    "p50": p50, "p99": p99, "placement": sorted(placed.values()),
                })  # fmt: skip
                print(rows[-1], flush=True)
            fleet.stop_workers()
    finally:
        fleet.close()
    return rows


# ---------------------------------------------------------------------- CURVE


def _keys(root: Path) -> tuple[list[str], dict[str, Any]]:
    """Server flags and the robot's client keys, written into `root`."""
    import shutil

    from runtime.keys import create_pair
    from transport.curve import load_client_keys

    for name in ("server", "robot"):
        create_pair(root, name)
    (root / "clients").mkdir()
    shutil.copy(root / "robot.key", root / "clients")
    flags = ["--curve-secret", str(root / "server.key_secret"), "--curve-clients", str(root / "clients")]
    return flags, {"keys": load_client_keys(root / "server.key", root / "robot.key_secret")}


def curve_cost(iters: int, rounds: int) -> list[dict[str, Any]]:
    """Round trips of one robot, CURVE off and on, to a single server and to a fleet of one worker."""
    with tempfile.TemporaryDirectory() as tmp:
        flags, client_kw = _keys(Path(tmp))
        setups = {}
        for where, extra in (("single server", []), ("fleet, 1 worker", ["--workers", "1"])):
            for curve_on in (False, True):
                setups[(where, curve_on)] = (extra + (flags if curve_on else []), client_kw if curve_on else {})
        servers = {k: ServerProcess("--fixed-reply", *argv, gateways=False).start() for k, (argv, _) in setups.items()}
        try:
            clients = {k: PolicyClient(servers[k].router, "curve", timeout_s=10, **kw) for k, (_, kw) in setups.items()}
            samples: dict[tuple, dict[str, list[float]]] = {k: {"ping": [], "infer": []} for k in setups}
            for c in clients.values():
                c.infer(IMAGES, PROMPT, STATE, generate_subtask=False)
            for _ in range(rounds):
                for k, c in clients.items():
                    for _ in range(iters // rounds):
                        t = time.perf_counter()
                        c.ping()
                        samples[k]["ping"].append(time.perf_counter() - t)
                        t = time.perf_counter()
                        c.infer(IMAGES, PROMPT, STATE, generate_subtask=False)
                        samples[k]["infer"].append(time.perf_counter() - t)
            for c in clients.values():
                c.close()
        finally:
            for s in servers.values():
                s.stop()
    rows = []
    for (where, curve_on), kinds in samples.items():
        row = {"where": where, "curve": curve_on}
        for kind, values in kinds.items():
            row[kind] = percentiles_ms(values)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------- the report


def report(args: argparse.Namespace, rows: list[dict[str, Any]], curve_rows: list[dict[str, Any]]) -> str:
    base = {
        r["robots"]: r["chunks_per_s"] for r in rows if r["workers"] == 1 and r["window_ms"] == args.batch_window_ms
    }
    backend = {
        "device": f"simulated device: {args.device_ms:g} ms per batch of up to {args.max_batch}, the fixed reply",
        "model": f"`{args.config}` (random weights)"
        + (" on its own GPU per worker" if args.gpu_ids else " on the CPU, one core and one XLA thread per worker"),
        "fixed": "the fixed reply, no device time (the broker's overhead alone)",
    }[args.backend]
    pinning = "GPU" if args.gpu_ids else f"core ({os.cpu_count()} cores here, shared round-robin)"
    lines = [
        f"Backend: {backend}. Each worker pinned to one {pinning};"
        f" robots ask back to back for {args.seconds:g} s (one 224x224 camera, 8 state values).",
        "",
        "| workers | robots | batch window ms | chunks/s | vs 1 worker | p50 ms | p99 ms | robots per worker |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r["chunks_per_s"] / base[r["robots"]] if r["robots"] in base else float("nan")
        lines.append(
            f"| {r['workers']} | {r['robots']} | {r['window_ms']:g} | {r['chunks_per_s']:.1f} | {ratio:.2f} | "
            f"{r['p50']:.1f} | {r['p99']:.1f} | {', '.join(map(str, r['placement']))} |"
        )
    lines += ["", *NOTES]
    if curve_rows:
        lines += [
            "",
            f"CURVE's cost: one robot, round trips p50 / p99 ms ({args.curve_iters} each; `ping` is a small message,"
            " `infer` carries the 224x224 camera and a 50x32 float32 chunk back).",
            "",
            "| endpoint | CURVE | ping p50 | ping p99 | infer p50 | infer p99 |",
            "|---|---|---|---|---|---|",
        ]
        for r in curve_rows:
            lines.append(
                f"| {r['where']} | {'on' if r['curve'] else 'off'} | {r['ping'][0]:.3f} | {r['ping'][1]:.3f} | "
                f"{r['infer'][0]:.3f} | {r['infer'][1]:.3f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("device", "model", "fixed"), default="device")
    parser.add_argument("--config", default="pi05_tiny", help="model config of --backend model")
    parser.add_argument("--device-ms", type=float, default=50.0, help="simulated device time per batch")
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--batch-window-ms", type=float, default=15.0, help="how long a worker waits for a batch")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--robots", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--seconds", type=float, default=5.0, help="measurement window per cell")
    parser.add_argument("--gpu-ids", type=int, nargs="*", default=[], help="one worker per GPU instead of per core")
    parser.add_argument("--curve-iters", type=int, default=400, help="round trips per CURVE cell (0: skip)")
    parser.add_argument("--curve-rounds", type=int, default=10)
    parser.add_argument("--serve-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("worker_argv", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.gpu_ids and max(args.workers) > len(args.gpu_ids):
        parser.error("--gpu-ids needs one GPU per worker: as many ids as the largest --workers")
    if args.serve_worker:
        serve_worker(args.worker_argv, args.device_ms, args.max_batch, args.batch_window_ms)
        return
    rows = throughput(args)
    curve_rows = curve_cost(args.curve_iters, args.curve_rounds) if args.curve_iters else []
    command = "python -m bench.fleet " + " ".join(sys.argv[1:])
    print(write_section(f"fleet_{args.backend}", f"Fleet: 1, 2, 4 workers behind one broker ({args.backend})",
                        report(args, rows, curve_rows), command.strip(), packages=("pyzmq", "msgpack")))  # fmt: skip


if __name__ == "__main__":
    main()
