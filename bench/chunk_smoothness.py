"""How smoothly a 50 Hz arm goes from one action chunk to the next: naive switching, crossfade, RTC.

The simulated arm (`robots.sim.SimArm`) runs the real control loop against the real policy server
(the tiny model through the real engine, over ZMQ on 127.0.0.1, in this process). Time is
virtual and the inference latency is injected: a reply reaches the loop exactly `latency /
period` control steps after its observation (half a period after that many steps, so it merges
at the next tick), however long the CPU took. Every request carries a seed from one sequence,
so a run is deterministic and every mode sees the same noise, request by request.

All modes ask for a chunk every `s` steps with one request in flight (replace and crossfade by
asking when H - s actions are left, RTC by its own cadence), so they differ only in how a chunk
takes over. Measured on the executed action stream a(t) (the joint and gripper commands handed to
the arm, in the policy's units):

- jerk: the third difference times hz^3, |a(t) - 3a(t-1) + 3a(t-2) - a(t-3)| * hz^3, per action
  dim: the mean and max over the run;
- boundary jerk: the largest jerk of a stencil that spans a chunk switch (the step a chunk starts
  being executed), as measured and as added by the switch (the jerk of a(t) minus the new
  chunk's own plan p(t), from the switch until the next one: zero where the arm executes exactly
  what the chunk planned, so a policy's own motion does not count);
- boundary step: the largest |a(t) - a(t-1)| across a switch;
- deviation: mean |a(t) - p(t)| where p(t) is the plan for step t of the chunk computed from the
  newest observation at or before t, arrived or not: what the policy meant to do at t.

The tiny model has random weights: its chunks are close to white noise along time (consecutive
actions of one chunk differ as much as two samples of different seeds do), so the measured
jerk everywhere is mostly the policy's own, and a switch between two noise sequences is, at the
measured level, just another noisy step. The "added by the switch" columns separate what each
blending mode contributes from what the policy does anyway.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
from typing import Any

import numpy as np

from bench.report import write_section
from configs import DEMO_MODEL, get_model_config
from policy.engine.inference import AsyncPi05Inference
from policy.engine.settings import EngineSettings
from policy.request import SCHEDULES
from robots.sim import SimArm
from robots.tasks import PickPlaceTask
from runtime.robot.chunk_buffer import BufferSettings
from runtime.robot.control_loop import ControlLoop, LoopSettings
from runtime.robot.virtual_time import Chunk, InjectedLatency, VirtualClock
from tests.support.ports import free_local_ports
from tests.support.server_thread import ServerThread
from transport.zmq_client import PolicyClient

MODES = ("replace", "crossfade", "rtc")


def _third_difference(x: np.ndarray) -> np.ndarray:
    """x(t) - 3x(t-1) + 3x(t-2) - x(t-3) for t = 3..; row t - 3 of the result is step t."""
    return x[3:] - 3 * x[2:-1] + 3 * x[1:-2] - x[:-3]


def metrics(executed: np.ndarray, chunks: list[Chunk], hz: float) -> dict[str, float]:
    """The smoothness numbers of one run (see the module docstring); `executed` is (T, dims)."""
    steps, dims = executed.shape
    jerk = np.abs(_third_difference(executed)) * hz**3
    # The plan each step was executed under (the newest arrived chunk) and the one the policy meant.
    switches = sorted(c.arrival_step for c in chunks[1:] if c.arrival_step is not None and c.arrival_step < steps)
    meant = np.full((steps, dims), np.nan)
    for c in sorted(chunks, key=lambda c: c.obs_step):
        rows = c.actions[: max(0, steps - c.obs_step), :dims]
        meant[c.obs_step : c.obs_step + len(rows)] = rows
    boundary_jerk, added_jerk, boundary_step = [], [], []
    for c in chunks[1:]:
        t = c.arrival_step
        if t is None or t + 3 > steps or t - 3 < c.obs_step:
            continue
        end = min([s for s in switches if s > t] + [steps, c.obs_step + len(c.actions)])
        own = np.full((steps, dims), np.nan)
        own[c.obs_step : end] = c.actions[: end - c.obs_step, :dims]
        window = slice(t - 3, end)  # the third differences of steps t .. end - 1
        added = np.abs(_third_difference(executed[window] - own[window])) * hz**3
        boundary_jerk.append(jerk[t - 3 : t].max())  # the stencils of steps t, t + 1, t + 2
        added_jerk.append(np.nanmax(added))
        boundary_step.append(np.abs(executed[t] - executed[t - 1]).max())
    seen = ~np.isnan(meant[:, 0])
    # Before a chunk lands the arm runs the old plan: how far that is from what the new one meant.
    stale = np.zeros(steps, bool)
    for c in chunks[1:]:
        if c.arrival_step is not None:
            stale[c.obs_step : min(c.arrival_step, steps)] = True
    return {
        "jerk_mean": float(jerk.mean()),
        "jerk_max": float(jerk.max()),
        "boundary_jerk_mean": float(np.mean(boundary_jerk)),
        "boundary_jerk_max": float(np.max(boundary_jerk)),
        "added_jerk_mean": float(np.mean(added_jerk)),
        "added_jerk_max": float(np.max(added_jerk)),
        "boundary_step_max": float(np.max(boundary_step)),
        "deviation_mean": float(np.abs(executed[seen] - meant[seen]).mean()),
        "switches": len(boundary_jerk),
        "own_step_mean": float(np.mean([np.abs(np.diff(c.actions[:, :dims], axis=0)).mean() for c in chunks])),
        "stale_gap_mean": float(np.abs(executed[stale] - meant[stale]).mean()),
    }


def run_one(
    server: ServerThread, mode: str, latency_steps: int, args: argparse.Namespace
) -> tuple[dict[str, float], dict[str, Any]]:
    """One loop of `args.duration` virtual seconds; its metrics and the last request's options."""
    cfg = get_model_config(args.config)
    # The demo policy was trained on the pick-and-place task: it runs on that task's scenes and prompt.
    task = PickPlaceTask() if args.config == DEMO_MODEL else None
    arm = SimArm(control_hz=args.hz, seed=args.seed, image_size=cfg.siglip.image_size, task=task)
    clock = VirtualClock()
    buffer = BufferSettings(
        blend=mode,
        request_when_left=cfg.action_horizon - args.execute_horizon,
        crossfade_steps=args.crossfade_steps,
        safe_action=arm.safe_action,
        rtc_execute_horizon=args.execute_horizon,
        rtc_schedule=args.schedule,
        rtc_max_guidance_weight=args.beta,
    )
    settings = LoopSettings(hz=args.hz, buffer=buffer, max_in_flight=1, max_decoding_steps=0)
    if task is not None:
        settings = dataclasses.replace(settings, prompt=arm.prompt)
    with PolicyClient(server.endpoints["router"], f"smooth-{mode}-{latency_steps}", timeout_s=120.0) as client:
        injected = InjectedLatency(client, arm, clock, latency_steps, args.hz)
        loop = ControlLoop(arm, injected, settings, clock=clock, sleep=clock.sleep)
        summary = loop.run(args.duration)
    if summary["underruns"]:
        raise RuntimeError(f"{mode} at {latency_steps} steps underran {summary['underruns']} times")
    executed = np.asarray(loop.executed)
    return metrics(executed, injected.chunks, args.hz), injected.requests[-1]


def _headline(results: dict[tuple[int, str], dict[str, float]], trained: bool) -> str:
    """One sentence per latency: RTC's boundary jerk (added by the switch, and as measured) against
    the other two modes'."""
    lines = []
    for ms in sorted({ms for ms, _ in results}):
        r = {mode: results[ms, mode] for mode in MODES}
        added = ", ".join(f"{mode} {r[mode]['added_jerk_mean']:.3g}" for mode in MODES)
        measured = ", ".join(f"{mode} {r[mode]['boundary_jerk_mean']:.3g}" for mode in MODES)
        lower = all(r["rtc"]["added_jerk_mean"] < r[m]["added_jerk_mean"] for m in ("replace", "crossfade"))
        lines.append(
            f"- {ms} ms: boundary jerk added by the switch (mean) {added}: RTC's is "
            f"{'below both' if lower else 'NOT below both'}; as measured (the policy's own included) {measured}."
        )
    ms = 200 if (200, "replace") in results else min(ms for ms, _ in results)
    own, gap = results[ms, "replace"]["own_step_mean"], results[ms, "replace"]["stale_gap_mean"]
    rtc_gap = results[ms, "rtc"]["stale_gap_mean"]
    spread = max(
        max(results[lat, m]["boundary_jerk_mean"] for m in MODES)
        / min(results[lat, m]["boundary_jerk_mean"] for m in MODES)
        for lat in {lat for lat, _ in results}
    )
    if trained:
        below = all(
            results[ms, "rtc"]["boundary_jerk_mean"] < results[ms, m]["boundary_jerk_mean"]
            for m in ("replace", "crossfade")
        )
        lines.append(
            f"\nReading it: a trained policy's chunk is smooth along time (it moves {own:.3g} per step on "
            f"average), so the jerk at a switch is what the switch adds. At {ms} ms the old plan the arm runs "
            f"before a new chunk lands is {gap:.3g} away from what the new one meant for those steps (replace) "
            f"and {rtc_gap:.3g} with RTC, whose new chunk continues the steps executed while it was computed: "
            "RTC's measured boundary jerk is "
            f"{'below' if below else 'NOT below'} both crossfade's and naive switching's."
        )
        return "\n".join(lines) + "\n\n"
    lines.append(
        f"\nReading it: this model's chunk moves {own:.3g} per step on average (its own step), and before a new chunk "
        f"lands, the old plan the arm runs is {gap:.3g} away from what the new one meant for those steps ({ms} ms, "
        f"replace; RTC: {rtc_gap:.3g}). Random weights make a chunk close to white noise along time, so switching "
        "from one noise sequence to another is, as measured, one more step of the size the policy takes anyway: the "
        f"measured boundary jerk of the three modes is within a factor {spread:.2f} at every latency (not below "
        "for RTC: it ties), and the mean and max jerk are the policy's own. What a switch adds, the jerk of the "
        "executed actions against the "
        "new chunk's own plan, is what separates them: RTC's new chunk already agrees with the steps the arm ran "
        "while it was computed (the frozen prefix, d steps), so its switch adds almost nothing, while replace jumps "
        "between two plans and crossfade spreads the same jump (plus the old plan's motion) over its window. With a "
        "trained policy, whose own jerk is small, the two measures coincide (`--checkpoint`)."
    )
    return "\n".join(lines) + "\n\n"


def run(args: argparse.Namespace) -> str:
    engine = AsyncPi05Inference(
        EngineSettings(
            args.config,
            checkpoint_dir=args.checkpoint,
            max_batch=1,
            batch_buckets=(1,),
            max_decoding_steps_limit=1,
            image_resolutions=((get_model_config(args.config).siglip.image_size,) * 2,),
            compile_in_background=False,
            rtc_method=args.rtc_method,
        )
    )
    asyncio.run(engine.start())
    router, pub = free_local_ports(2)
    argv = ["--config", args.config, "--router-port", str(router), "--pub-port", str(pub), "--ws-port", "0",
            "--openpi-port", "0", "--log-level", "WARNING"]  # fmt: skip
    results: dict[tuple[int, str], dict[str, float]] = {}
    sent: dict[int, dict[str, Any]] = {}
    try:
        with ServerThread(argv, backend=engine) as server:
            for latency_ms in args.latency_ms:
                steps = round(latency_ms * args.hz / 1e3)
                for mode in MODES:
                    results[latency_ms, mode], last = run_one(server, mode, steps, args)
                    if mode == "rtc":
                        sent[latency_ms] = last
                    print(latency_ms, mode, results[latency_ms, mode], flush=True)
    finally:
        asyncio.run(engine.close())
    rows = [
        f"| {ms} | {mode} | {m['jerk_mean']:.3g} | {m['jerk_max']:.3g} | {m['boundary_jerk_mean']:.3g} | "
        f"{m['boundary_jerk_max']:.3g} | {m['added_jerk_mean']:.3g} | {m['added_jerk_max']:.3g} | "
        f"{m['boundary_step_max']:.3g} | {m['deviation_mean']:.3g} | {m['switches']} |"
        for (ms, mode), m in results.items()
    ]
    rtc_sent = "; ".join(f"{ms} ms: d={o['inference_delay']}, s={o['execute_horizon']}" for ms, o in sent.items())
    body = (
        f"Config `{args.config}` ({args.checkpoint or 'random weights'}) on CPU, `SimArm` at {args.hz:g} Hz, "
        f"{args.duration:g} virtual seconds per row, the latency injected in steps, seeds 1, 2, ... per request. "
        f"A chunk every s = {args.execute_horizon} steps, one request in flight; crossfade over "
        f"{args.crossfade_steps} steps; RTC with the `{args.schedule}` schedule, beta = {args.beta:g}, "
        f"`--rtc-method {args.rtc_method}`; d and s of the last RTC request: {rtc_sent}. Jerk in action units / s^3, "
        'on the executed actions; "added" is the jerk of the executed actions minus the new chunk\'s own plan, '
        "from a switch to the next: what the switch contributes, the policy's own motion left out "
        "(`bench/chunk_smoothness.py` defines each column).\n\n"
        + _headline(results, trained=args.checkpoint is not None)
        + "| latency ms | mode | jerk mean | jerk max | boundary jerk mean | boundary jerk max | added by the switch, "
        "mean | added, max | boundary step max | deviation from the plan, mean | switches |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    command = (
        f"python -m bench.chunk_smoothness --config {args.config}"
        + (f" --checkpoint {args.checkpoint}" if args.checkpoint else "")
        + f" --latency-ms {' '.join(map(str, args.latency_ms))} --duration {args.duration:g}"
        f" --execute-horizon {args.execute_horizon} "
        f"--schedule {args.schedule} --beta {args.beta:g} --rtc-method {args.rtc_method}"
    )
    return write_section(
        f"chunk_smoothness_{args.config}", f"Chunk transitions: replace, crossfade, RTC ({args.config})", body, command
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="pi05_tiny")
    parser.add_argument("--checkpoint", default=None, help="trained weights (default: the config's random ones)")
    parser.add_argument("--duration", type=float, default=10.0, help="virtual seconds per run")
    parser.add_argument("--hz", type=float, default=50.0)
    parser.add_argument("--latency-ms", type=int, nargs="+", default=[100, 200, 300])
    parser.add_argument("--execute-horizon", type=int, default=25, help="s: steps executed per chunk")
    parser.add_argument("--crossfade-steps", type=int, default=8)
    parser.add_argument("--schedule", choices=SCHEDULES, default="exp")
    # 10 = the flow's step count: a weight of 1 / dt corrects the whole error in one Euler step
    # (beta = 5 left the frozen steps 3.5x further from the leftover on this model).
    parser.add_argument("--beta", type=float, default=10.0, help="RTC's max guidance weight")
    parser.add_argument("--rtc-method", choices=("vjp", "identity"), default="vjp")
    parser.add_argument("--seed", type=int, default=0, help="the arm's")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(run(args))


if __name__ == "__main__":
    main()
