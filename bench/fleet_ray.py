"""The fleet's workers placed by Ray (`--ray`) against workers started by hand, and why robots'
requests do not go through Ray: in a network namespace with only loopback, as every Ray run here.

    unshare -n sh -c 'ip link set lo up && python -m bench.fleet_ray --workers 2 --robots 32'

1. Placement: one broker (`python -m runtime.broker`, workers joining over TCP with CURVE), its workers
   the simulated accelerator of `bench.fleet` (`--device-ms` per batch, no CPU), started either as
   local processes or as Ray actors (`runtime.fleet.ray_cluster.Replica`, the same command); the same
   robots ask back to back. Chunks per second and start-up time (workers started to all joined).
2. The hop: one robot's round trip through the broker to one fixed-reply worker, against a call of a
   Ray actor method carrying the same observation and returning the same chunk (Ray's own RPC, which a
   request would take if robots went through Ray), and against an HTTP POST of it (msgpack, as openpi
   encodes it) through Ray Serve's proxy to a deployment that answers the chunk (with the `bench` extra,
   `ray[serve]`; left out without it), taking turns in rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import ray

from bench.fleet import IMAGES, PROMPT, STATE, Fleet, run_robots
from bench.report import percentiles_ms, time_rounds, write_section
from runtime.fleet.ray_cluster import RayReplicas, ReplicaSpec, connect, make_keys
from tests.support.ports import free_local_ports
from transport import openpi_msgpack
from transport.curve import PUBLIC_SUFFIX, SECRET_SUFFIX
from transport.zmq_client import PolicyClient

CHUNK = np.zeros((50, 32), np.float32)


@ray.remote(num_cpus=0)
class EchoPolicy:
    """A policy behind Ray's RPC that does nothing: what the hop itself costs."""

    def infer(self, images: dict[str, np.ndarray], prompt: str, state: np.ndarray) -> dict[str, Any]:
        return {"actions": CHUNK}


def placement(args: argparse.Namespace, folder: Path) -> list[dict[str, Any]]:
    secret, allowed, slots = make_keys(folder, args.workers)
    local_keys = []
    for i in range(args.workers):
        own = folder / f"local-{i}{SECRET_SUFFIX}"
        own.write_text(slots[i].secret)
        own.chmod(0o600)
        local_keys.append((folder / f"broker{PUBLIC_SUFFIX}", own))
    rows = []
    fleet = Fleet("device", "pi05_tiny", args.device_ms, args.max_batch, worker_curve=(secret, allowed))
    try:
        for where in ("local", "ray", "local", "ray"):  # twice each, alternating: the machine's load on both
            started = time.monotonic()
            replicas = None
            if where == "local":
                fleet.start_workers(args.workers, args.batch_window_ms, keys=local_keys)
            else:
                command = (sys.executable, *fleet.worker_command(args.batch_window_ms))
                replicas = RayReplicas(ReplicaSpec(command, cpus=args.cpus_per_replica), slots)
                for _ in range(args.workers):
                    replicas.add()
                fleet.wait_joined(args.workers)
            startup_s = time.monotonic() - started
            names = [f"{where}-{len(rows)}-{i}" for i in range(args.robots)]
            served, latencies, window, placed = asyncio.run(
                run_robots(fleet.router, names, args.seconds, fleet.placement)
            )
            p50, p99 = percentiles_ms(latencies)
            rows.append({
                "where": where, "startup_s": startup_s, "chunks_per_s": served / window, "p50": p50, "p99": p99,
                "placement": sorted(placed.values()),
            })  # fmt: skip
            print(rows[-1], flush=True)
            if replicas is not None:
                replicas.close()
                while fleet.placement():
                    time.sleep(0.05)
            else:
                fleet.stop_workers()
    finally:
        fleet.close()
    return rows


def serve_call(port: int) -> Callable[[], None] | None:
    """A POST of the observation through Ray Serve's HTTP proxy, or None without `ray[serve]`."""
    try:
        import requests
        from ray import serve
        from starlette.responses import Response
    except ImportError:
        return None

    @serve.deployment
    class HttpPolicy:
        async def __call__(self, request: Any) -> Response:
            openpi_msgpack.unpackb(await request.body())
            return Response(openpi_msgpack.packb({"actions": CHUNK}), media_type="application/msgpack")

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(HttpPolicy.bind(), route_prefix="/infer")
    session = requests.Session()
    url = f"http://127.0.0.1:{port}/infer"

    def call() -> None:
        body = openpi_msgpack.packb({"images": IMAGES, "prompt": PROMPT, "state": STATE})
        reply = session.post(url, data=body, timeout=60)
        reply.raise_for_status()
        openpi_msgpack.unpackb(reply.content)

    return call


def hop(args: argparse.Namespace) -> dict[str, list[float]]:
    """Round trips of one robot: through the broker to a fixed-reply worker, a Ray actor call, and
    an HTTP call through Ray Serve."""
    fleet = Fleet("fixed", "pi05_tiny", 0.0, 1)
    try:
        fleet.start_workers(1, 3.0)
        echo = EchoPolicy.remote()
        ray.get(echo.infer.remote(IMAGES, PROMPT, STATE))
        with PolicyClient(fleet.router, "hop") as client:
            calls = {
                "broker -> worker (ZMQ frames)": lambda: client.infer(IMAGES, PROMPT, STATE, generate_subtask=False),
                "Ray actor call (Ray's RPC)": lambda: ray.get(echo.infer.remote(IMAGES, PROMPT, STATE)),
            }
            served = serve_call(free_local_ports(1)[0])
            if served is not None:
                calls["Ray Serve: HTTP POST through its proxy (msgpack)"] = served
            return time_rounds(calls, dict.fromkeys(calls, args.hop_iters // args.rounds), args.rounds, warmup=20)
    finally:
        fleet.close()


def report(args: argparse.Namespace, rows: list[dict[str, Any]], hops: dict[str, list[float]]) -> str:
    lines = [
        f"Simulated device: {args.device_ms:g} ms per batch of up to {args.max_batch}; {args.workers} workers, "
        f"{args.robots} robots asking back to back for {args.seconds:g} s per run (one 224x224 camera); "
        f"both placements join the same broker over TCP with CURVE; Ray replicas get "
        f"{args.cpus_per_replica:g} CPU each. Runs alternate, two of each.",
        "",
        "| placement | start-up s (started to all joined) | chunks/s | p50 ms | p99 ms | robots per worker |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['where']} | {r['startup_s']:.1f} | {r['chunks_per_s']:.1f} | {r['p50']:.1f} | {r['p99']:.1f} | "
            f"{', '.join(map(str, r['placement']))} |"
        )
    mean = {w: np.mean([r["chunks_per_s"] for r in rows if r["where"] == w]) for w in ("local", "ray")}
    ratio = mean["ray"] / mean["local"]
    lines += [
        "",
        f"Ray's placement serves {ratio:.3f}x the chunks of local workers (target: within 5%): once joined, a"
        " replica is a worker like any other, and no request touches Ray.",
        "",
    ]
    base = None
    lines += ["| one robot's round trip | p50 ms | p99 ms | vs broker |", "|---|---|---|---|"]
    for name, samples in hops.items():
        p50, p99 = percentiles_ms(samples)
        base = base or p50
        lines.append(f"| {name} | {p50:.3f} | {p99:.3f} | {p50 / base:.2f}x |")
    lines += ["", "Ray's own RPC carries the observation through Ray's object serialization and its core worker "
              "for each call; Ray Serve adds an HTTP request to its proxy process, which then calls the "
              "deployment over Ray's RPC. Neither batches across robots, keeps a robot on its worker or "
              "forwards refreshes; the broker path is the one robots take."]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--robots", type=int, default=32)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--device-ms", type=float, default=50.0)
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--batch-window-ms", type=float, default=15.0)
    p.add_argument("--cpus-per-replica", type=float, default=0.5)
    p.add_argument("--hop-iters", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=10)
    args = p.parse_args()
    connect("local")
    try:
        with tempfile.TemporaryDirectory(prefix="pi05-fleet-ray-") as tmp:
            rows = placement(args, Path(tmp))
            hops = hop(args)
    finally:
        ray.shutdown()
    command = f"unshare -n sh -c 'ip link set lo up && {' '.join(['python -m bench.fleet_ray', *sys.argv[1:]])}'"
    print(write_section("fleet_ray", "Fleet on Ray", report(args, rows, hops), command, ("pyzmq", "ray")))


if __name__ == "__main__":
    main()
