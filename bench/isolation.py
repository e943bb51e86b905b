"""Isolation between transports: a ZMQ robot's `ping` while a JSON client sends large images.

One run of `python -m runtime.policy_server` on the tiny model (random weights), in its own process
as deployed. A ZMQ client pings it at a steady rate; in alternating phases one JSON client, in a
process of its own, sends requests of three 480x640 images (nested lists, as the JSON API takes
them) back to back. JSON parsing, image conversion and encoding are CPU work: if they ran where the
ROUTER is served, every robot would wait for them. The target: the ping's p99 while the JSON client
sends stays within 5x of its p99 alone. The phases alternate (alone, loaded, alone, ...) so that
other work on the machine falls on both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import os
import time
from typing import Any

import numpy as np

from bench.report import percentiles_ms, write_section
from bench.transport_latency import ACTION_DIM, HORIZON, PROMPT, wait_compiled
from robots.adapters import BASE, LEFT_WRIST, RIGHT_WRIST
from tests.support.server_process import ServerProcess
from transport.errors import TransportError
from transport.ws_client import JsonApiClient, build_request
from transport.zmq_client import PolicyClient

CAMERAS = (BASE, LEFT_WRIST, RIGHT_WRIST)
JSON_IMAGE_HW = (480, 640)


def _json_sender(url: str, sending: Any, idle: Any, stop: Any, results: Any) -> None:
    """The JSON client's process: while `sending` is set, one request after another; `idle` is set
    whenever no request is in flight. Puts (round trips in s, error codes) on `results` at the end."""

    async def main() -> None:
        rng = np.random.default_rng(1)
        images = {name: rng.integers(0, 256, (*JSON_IMAGE_HW, 3), dtype=np.uint8) for name in CAMERAS}
        request = build_request(images, PROMPT, rng.uniform(-1, 1, 8), generate_subtask=False)
        round_trips: list[float] = []
        errors: list[str] = []
        async with JsonApiClient(url, timeout_s=120.0) as client:
            idle.set()
            while not stop.is_set():
                if not sending.is_set():
                    idle.set()
                    await asyncio.sleep(0.01)
                    continue
                idle.clear()
                start = time.perf_counter()
                try:
                    reply = await client.request(request)
                    if np.shape(reply["actions"]) != (1, HORIZON, ACTION_DIM):
                        errors.append(f"actions of shape {np.shape(reply['actions'])}")
                    else:
                        round_trips.append(time.perf_counter() - start)
                except (TransportError, ConnectionError) as e:
                    errors.append(getattr(e, "code", type(e).__name__))
        results.put((round_trips, errors))

    asyncio.run(main())


def _ping_phase(client: PolicyClient, duration_s: float, interval_s: float) -> list[float]:
    """Pings at a steady rate (a control loop's cadence, not back to back) for `duration_s`."""
    samples = []
    end = time.monotonic() + duration_s
    next_at = time.monotonic()
    while time.monotonic() < end:
        start = time.perf_counter()
        client.ping()
        samples.append(time.perf_counter() - start)
        next_at = max(next_at + interval_s, time.monotonic())  # late: no burst to catch up
        time.sleep(max(0.0, next_at - time.monotonic()))
    return samples


def run(phase_s: float, cycles: int, interval_s: float, max_batch: int) -> str:
    ctx = multiprocessing.get_context("spawn")
    sending, idle, stop, results = ctx.Event(), ctx.Event(), ctx.Event(), ctx.Queue()
    alone: list[float] = []
    loaded: list[float] = []
    with ServerProcess("--max-batch", str(max_batch)) as server:
        sender = ctx.Process(target=_json_sender, args=(server.ws, sending, idle, stop, results), daemon=True)
        sender.start()
        try:
            with PolicyClient(server.router, "isolation-probe", timeout_s=30.0) as client:
                wait_compiled(client)
                startup_rss = server.rss_mb()
                if not idle.wait(120):
                    raise RuntimeError("the JSON client did not connect")
                # Warm-up: the JSON path's first requests (the engine's resize and model at this size).
                sending.set()
                _ping_phase(client, min(phase_s, 5.0), interval_s)
                sending.clear()
                idle.wait(120)
                load_start = os.getloadavg()[0]
                for _ in range(cycles):
                    alone += _ping_phase(client, phase_s, interval_s)
                    sending.set()
                    loaded += _ping_phase(client, phase_s, interval_s)
                    sending.clear()
                    if not idle.wait(120):
                        raise RuntimeError("the JSON client's request never finished")
                load = (load_start, os.getloadavg()[0])
        finally:
            stop.set()
        json_round_trips, json_errors = results.get(timeout=180)
        sender.join(30)
        complaints = len(server.complaints())
        flags = f"--phase {phase_s:g} --cycles {cycles} --interval {interval_s:g} --max-batch {max_batch}"
    return _report(alone, loaded, json_round_trips, json_errors, startup_rss, load, complaints, flags)


def _report(
    alone: list[float],
    loaded: list[float],
    json_round_trips: list[float],
    json_errors: list[str],
    rss: dict[str, float],
    load: tuple[float, float],
    complaints: int,
    flags: str,
) -> str:
    a50, a99 = percentiles_ms(alone)
    l50, l99 = percentiles_ms(loaded)
    j50, j99 = percentiles_ms(json_round_trips) if json_round_trips else (float("nan"), float("nan"))
    ratio = l99 / a99
    body = (
        "`python -m runtime.policy_server` on `pi05_tiny` (random weights, CPU), in its own process with its "
        "gateway processes, as deployed. A ZMQ `PolicyClient.ping` at a steady rate, alone and while one JSON "
        f"client (its own process) sends requests of three {JSON_IMAGE_HW[0]}x{JSON_IMAGE_HW[1]} images (nested "
        "lists) back to back, in alternating phases; the JSON requests run the model (actions only). "
        f"Process sizes once compiled: {', '.join(f'{k} {v:.0f} MB' for k, v in rss.items())}. 1-minute load "
        f"average {load[0]:.2f} at the start, {load[1]:.2f} at the end (2 cores).\n\n"
        "| ZMQ ping | pings | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|\n"
        f"| alone | {len(alone)} | {a50:.2f} | {a99:.2f} | {max(alone) * 1e3:.2f} |\n"
        f"| while the JSON client sends | {len(loaded)} | {l50:.2f} | {l99:.2f} | {max(loaded) * 1e3:.2f} |\n\n"
        f"- loaded p99 / alone p99: **{ratio:.1f}x** (target at most 5x: {'met' if ratio <= 5 else 'NOT met'})\n"
        f"- JSON requests answered (warm-up included): {len(json_round_trips)}, round trip p50 {j50:.0f} ms, "
        f"p99 {j99:.0f} ms; "
        f"errors: {len(json_errors)}{' (' + ', '.join(sorted(set(json_errors))) + ')' if json_errors else ''}\n"
        f"- server log lines at WARNING or above during the run: {complaints}\n"
    )
    return write_section(
        "isolation",
        "Isolation: a ZMQ ping while a JSON client sends 480x640 images",
        body,
        f"python -m bench.isolation {flags}",
        packages=("jax", "jaxlib", "pyzmq", "websockets"),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", type=float, default=10.0, help="seconds of each phase (alone, loaded)")
    parser.add_argument("--cycles", type=int, default=3, help="alone/loaded phase pairs")
    parser.add_argument("--interval", type=float, default=0.01, help="seconds between pings")
    parser.add_argument("--max-batch", type=int, default=1, help="the server's --max-batch (one JSON client)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(run(args.phase, args.cycles, args.interval, args.max_batch))


if __name__ == "__main__":
    main()
