"""The engine as served: what a caller of `submit` gets, beside the device time of the phases.

Everything a robot's request goes through is in the clock: uint8 camera images at the robot's
resolution, validation, resizing and tokenizing on the host pool, the batch window, the scheduler
and the AOT executables. Per batch size B (B requests submitted at once), with and without the
subtask stage: the callers' median latency and the engine's own phase times (`subtask_ms`,
`action_ms` of the results: the executables' wall time on the device thread).

Then the interference check of a control loop: robot A sends action-only requests back to back,
alone, then while robot B asks for a 25-token subtask refresh every 0.25 s; rounds alternate in
the same run so machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time

import numpy as np

from bench.report import write_section
from policy.engine import jax_setup
from policy.engine.inference import AsyncPi05Inference
from policy.engine.settings import EngineSettings
from policy.request import InferenceRequest, Observation, Options

log = logging.getLogger("bench.engine_latency")


def _images(engine: AsyncPi05Inference, seed: int, hw: tuple[int, int]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.integers(0, 256, (*hw, 3), dtype=np.uint8) for k in engine.cfg.image_keys}


def _request(engine, seed: int, hw, subtask: bool, steps: int, kind="infer", priority="action") -> InferenceRequest:
    options = Options(generate_subtask=subtask, max_decoding_steps=steps, temperature=0.0, seed=seed)
    state = np.linspace(-0.5, 0.5, 8).astype(np.float32)
    return InferenceRequest(
        Observation(_images(engine, seed, hw), state), "pick up the red block", options, kind, priority
    )


async def _served(engine, b: int, subtask: bool, steps: int, hw, iters: int) -> dict[str, float]:
    walls, actions, subtasks, tokens = [], [], [], []
    for i in range(iters + 1):  # the first round warms the host pool and the caches
        requests = [_request(engine, 1000 * i + r, hw, subtask, steps) for r in range(b)]
        start = time.perf_counter()
        results = await asyncio.gather(*(engine.submit(r) for r in requests))
        wall = (time.perf_counter() - start) * 1e3
        if i == 0:
            continue
        walls.append(wall)
        actions.append(np.median([r.timing["action_ms"] for r in results]))
        subtasks.append(np.median([r.timing["subtask_ms"] for r in results]))
        tokens.append(max(len(r.subtask_tokens) for r in results))
    return dict(
        wall=float(np.median(walls)),
        action=float(np.median(actions)),
        subtask=float(np.median(subtasks)),
        tokens=int(np.median(tokens)),
    )


async def _robot_a(engine, hw, duration_s: float, seed: int) -> list[float]:
    """Robot A: action-only requests back to back for `duration_s`; its latencies in ms."""
    samples, i = [], 0
    end = time.perf_counter() + duration_s
    while time.perf_counter() < end:
        start = time.perf_counter()
        await engine.submit(_request(engine, seed + i, hw, False, 1))
        samples.append((time.perf_counter() - start) * 1e3)
        i += 1
    return samples


async def _robot_b(engine, hw, stop: asyncio.Event, interval_s: float, tokens: int, decoded: list[int]) -> None:
    """Robot B's refresh as the service's ticker runs it: a subtask of `tokens` tokens every
    `interval_s`, one in flight at a time (a late refresh delays the next, never piles up)."""
    i = 0
    while not stop.is_set():
        start = time.perf_counter()
        request = _request(engine, 7_000_000 + i, hw, True, tokens, kind="subtask", priority="refresh")
        decoded.append(len((await engine.submit(request)).subtask_tokens))
        i += 1
        try:
            await asyncio.wait_for(stop.wait(), max(0.0, interval_s - (time.perf_counter() - start)))
        except TimeoutError:
            pass


async def _interference(engine, hw, rounds: int, round_s: float, interval_s: float, tokens: int) -> dict:
    alone: list[float] = []
    shared: list[float] = []
    decoded: list[int] = []
    await _robot_a(engine, hw, 2.0, 0)  # warm-up
    for r in range(rounds):
        alone += await _robot_a(engine, hw, round_s, 10_000 * r)
        stop = asyncio.Event()
        refresher = asyncio.create_task(_robot_b(engine, hw, stop, interval_s, tokens, decoded))
        await asyncio.sleep(interval_s)  # B's first refresh is under way
        shared += await _robot_a(engine, hw, round_s, 10_000 * r + 5000)
        stop.set()
        await refresher
    pct = lambda xs, q: float(np.percentile(xs, q))  # noqa: E731
    return dict(
        alone=(pct(alone, 50), pct(alone, 90), len(alone)),
        shared=(pct(shared, 50), pct(shared, 90), len(shared)),
        refreshes=len(decoded),
        tokens=int(np.median(decoded)) if decoded else 0,
    )


async def _run(args) -> str:
    engine = AsyncPi05Inference(
        EngineSettings(
            args.config,
            tokenizer_path=args.tokenizer,
            max_batch=max(args.batch),
            batch_buckets=args.batch,
            batch_window_ms=args.window_ms,
            max_decoding_steps_limit=max(args.steps, 25),
            image_resolutions=[tuple(args.image)],
            compile_in_background=False,
            deadline_s=60.0,
        )
    )
    await engine.start()
    hw = tuple(args.image)
    try:
        rows = []
        for b in args.batch:
            for subtask in (False, True):
                m = await _served(engine, b, subtask, args.steps, hw, args.iters)
                phases = m["action"] + (m["subtask"] if subtask else 0.0)
                rows.append(
                    f"| {b} | {'yes' if subtask else 'no'} | {m['tokens'] if subtask else '-'} | {m['wall']:.1f} | "
                    f"{m['subtask']:.1f} | {m['action']:.1f} | {m['wall'] / phases:.2f} |"
                )
                log.info("B=%d subtask=%s: served %.1f ms, phases %.1f ms", b, subtask, m["wall"], phases)
        i = await _interference(engine, hw, args.rounds, args.round_s, 0.25, 25)
    finally:
        await engine.close()
    counts = ", ".join(f"{k[0]}x{k[1]}: {v}" for k, v in sorted(engine.batch_counts.items()))
    (a50, a90, an), (s50, s90, sn) = i["alone"], i["shared"]
    body = (
        f"Config `{args.config}` ({engine.cfg.dtype}), random weights, {len(engine.cfg.image_keys)} cameras of "
        f"{hw[0]}x{hw[1]} uint8, {engine.cfg.num_steps} flow steps, greedy subtask budget {args.steps}, "
        f"batch window {args.window_ms} ms, "
        f"subtask decoded in segments of {engine.settings.decode_segment_tokens} tokens, "
        f"{args.iters} rounds per cell (median).\n\n"
        "Served: B requests submitted at once, wall time until the last answer (host preparation, batch window, "
        "scheduler and AOT executables included). Phase columns: the engine's own device-thread time of each "
        "phase (median over the batch).\n\n"
        "| batch | subtask stage | tokens | served ms | subtask phase ms | action phase ms | served / phases |\n"
        "|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        f"Batches executed (phase x real rows: count): {counts}.\n\n"
        "Robot A, action-only requests back to back; alone vs while robot B refreshes its subtask every 0.25 s "
        f"({i['tokens']} tokens decoded per refresh, {i['refreshes']} refreshes), {args.rounds} alternating rounds "
        f"of {args.round_s} s each, same run:\n\n"
        "| robot A | p50 ms | p90 ms | requests |\n|---|---|---|---|\n"
        f"| alone | {a50:.1f} | {a90:.1f} | {an} |\n"
        f"| while B refreshes | {s50:.1f} | {s90:.1f} | {sn} |\n"
        f"| ratio (target <= 1.3 p50, <= 1.5 p90) | {s50 / a50:.2f} | {s90 / a90:.2f} | |\n"
    )
    if engine.device is not None and engine.device.platform == "cpu":
        body += "\nCPU timings: only the ratios mean something here; absolute times mean something only on a GPU.\n"
    command = (
        f"python -m bench.engine_latency --config {args.config} --batch {' '.join(map(str, args.batch))} "
        f"--steps {args.steps} --iters {args.iters} --rounds {args.rounds} --round-s {args.round_s}"
    )
    return write_section(f"engine_latency_{args.config}", f"Engine latency as served: {args.config}", body, command)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="pi05_tiny")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=25, help="subtask decoding budget")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--image", type=int, nargs=2, default=[480, 640], metavar=("H", "W"))
    parser.add_argument("--window-ms", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--round-s", type=float, default=8.0)
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer file (the full configs need one; for timing, the tiny one serves: prompts differ in length)",
    )
    parser.add_argument("--compile-cache", default=str(jax_setup.DEFAULT_COMPILE_CACHE))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    jax_setup.configure(args.compile_cache)
    print(asyncio.run(_run(args)))


if __name__ == "__main__":
    main()
