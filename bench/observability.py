"""What metrics and Rerun cost: off they must cost nothing, on they must not cost a robot its rate.

Three measurements, each against a baseline measured in the same run:
1. The server's round trip: `PolicyClient` -> `--fixed-reply` server, with `--metrics-port` and
   `--rerun save` on against a server with both off (two processes, rounds interleaved), p50 ratio.
2. The control loop's own cost per tick, on the simulated clock (no sleeping: the loop's code
   alone), with `LoopMetrics` and a Rerun sink saving a file against the loop with neither.
3. A 50 Hz loop of `robots.run` on the demo policy (`pi05_demo`, its own server process) with
   `--metrics-port` and `--rerun save` on, beside the same run with both off: underruns.

    python -m bench.observability --iters 2000 --rounds 10 --ticks 5000 --loop-s 20
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry

from bench.report import percentiles_ms, time_rounds, write_section
from runtime.rerun_sink import RerunSink, RerunTarget
from runtime.robot.metrics import LoopMetrics
from runtime.robot.rerun_log import RobotLog
from runtime.robot.virtual_time import VirtualClock
from tests.support.ports import free_local_ports
from tests.support.server_process import REPO, ServerProcess
from tests.support.simulated_loop import START_S, CountingRobot, SimServer, simulated_loop
from transport.zmq_client import PolicyClient

IMAGES = {name: np.zeros((224, 224, 3), np.uint8) for name in ("base_0_rgb", "left_wrist_0_rgb")}
STATE = np.zeros(8, np.float32)
BEFORE, OFF, ON = "before metrics and Rerun", "both off", "metrics + rerun on"
# The last revision before metrics and Rerun came in: the baseline that "off costs nothing" is read against.
BASELINE_REVISION = "355e4d9"


def server_round_trip(iters: int, rounds: int, out_dir: Path, baseline: Path) -> dict[str, list[float]]:
    """The round trip to a server of the `baseline` checkout (the revision before metrics and Rerun),
    to this one with both off, and to this one with both on."""
    (metrics_port,) = free_local_ports(1)
    observed = ("--metrics-port", str(metrics_port), "--rerun", "save", str(out_dir / "server.rrd"))
    with contextlib.ExitStack() as stack:
        calls = {}
        for name, flags, repo in ((BEFORE, (), baseline), (OFF, (), REPO), (ON, observed, REPO)):
            # The checkout's own packages ahead of the installed (editable) ones: its code runs.
            env = {"PYTHONPATH": str(repo)}
            server = stack.enter_context(ServerProcess("--fixed-reply", *flags, gateways=False, repo=repo, env=env))
            client = stack.enter_context(PolicyClient(server.router, f"bench-{len(calls)}"))
            calls[name] = functools.partial(client.infer, IMAGES, "pick up the cup", STATE, generate_subtask=False)
        return time_rounds(calls, {name: max(1, iters // rounds) for name in calls}, rounds, warmup=20)


@contextlib.contextmanager
def checkout(revision: str) -> Iterator[Path]:
    """A worktree of this repository at `revision`, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="pi05-baseline-") as tmp:
        path = Path(tmp) / "repo"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), revision], check=True,
                       capture_output=True)  # fmt: skip
        try:
            yield path
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)], capture_output=True)


def loop_tick_cost(ticks: int, rounds: int, out_dir: Path) -> dict[str, list[float]]:
    """Seconds per tick of the loop's own code on the simulated clock, each round a fresh loop."""
    sink = RerunSink.open(RerunTarget("save", str(out_dir / "loop.rrd")))
    metrics = LoopMetrics(CollectorRegistry())
    per_tick: dict[str, list[float]] = {OFF: [], ON: []}
    try:
        for r in range(rounds):
            for name in (OFF, ON) if r % 2 == 0 else (ON, OFF):
                clock = VirtualClock(START_S)
                on = name == ON
                loop = simulated_loop(
                    SimServer(clock, 0.1),
                    CountingRobot(clock),
                    on_tick=metrics if on else None,
                    rerun=RobotLog(sink, "bench") if on else None,
                    buffer={"request_when_left": 20},
                )
                start = time.perf_counter()
                summary = loop.run(ticks / 50.0)
                per_tick[name].append((time.perf_counter() - start) / max(1, summary["ticks"]))
    finally:
        sink.close()
    per_tick["dropped"] = [float(sink.dropped)]
    return per_tick


def demo_loop(seconds: float, out_dir: Path) -> dict[str, dict]:
    """`robots.run` at 50 Hz on the demo policy, observers off then on, against one server."""
    results = {}
    with ServerProcess("--config", "pi05_demo", gateways=False) as server:
        for name in (OFF, ON, OFF, ON):
            stats = out_dir / f"{name.replace(' ', '_')}.json"
            argv = [sys.executable, "-m", "robots.run", "--server", server.router, "--duration", str(seconds)]
            argv += ["--stats-json", str(stats), "--log-level", "WARNING"]
            if name == ON:
                (port,) = free_local_ports(1)
                argv += ["--metrics-port", str(port), "--rerun", "save", str(out_dir / "robot.rrd")]
            subprocess.run(argv, check=True, timeout=seconds + 600, capture_output=True)
            summary = json.loads(stats.read_text())
            results.setdefault(name, []).append(summary)
    return {name: {k: [s[k] for s in runs] for k in runs[0]} for name, runs in results.items()}


def run(iters: int, rounds: int, ticks: int, loop_s: float, baseline: str) -> str:
    with tempfile.TemporaryDirectory(prefix="pi05-observability-") as tmp, checkout(baseline) as before:
        out = Path(tmp)
        load = [os.getloadavg()[0]]
        trip = server_round_trip(iters, rounds, out, before)
        tick = loop_tick_cost(ticks, rounds, out)
        demo = demo_loop(loop_s, out)
        load.append(os.getloadavg()[0])
    (off50, off99), (on50, on99) = percentiles_ms(trip[OFF]), percentiles_ms(trip[ON])
    before50, before99 = percentiles_ms(trip[BEFORE])
    tick_off, tick_on = float(np.median(tick[OFF])) * 1e6, float(np.median(tick[ON])) * 1e6
    lines = [
        "Metrics and Rerun cost nothing when off (no code runs: the hooks are `None`) and must not cost a robot "
        f"its rate when on. 1-minute load average {load[0]:.2f} at the start, {load[1]:.2f} at the end (2 cores).",
        "",
        f"The server's baseline is revision `{baseline}` (the last before metrics and Rerun), checked out and run "
        "beside this one: 'off' against it is what the hooks cost when nothing hangs on them.",
        "",
        "| measurement | before (baseline revision) | both off | metrics + rerun on | off / before | on / off |",
        "|---|---|---|---|---|---|",
        f"| server round trip p50, ms (`PolicyClient`, 2 cameras, fixed reply; {len(trip[OFF])} each, rounds "
        f"interleaved) | {before50:.3f} | {off50:.3f} | {on50:.3f} | {off50 / before50:.2f}x | {on50 / off50:.2f}x |",
        f"| server round trip p99, ms | {before99:.3f} | {off99:.3f} | {on99:.3f} | {off99 / before99:.2f}x | "
        f"{on99 / off99:.2f}x |",
        f"| control loop's own code per tick, us (simulated clock, {ticks} ticks x {rounds} rounds, median) | | "
        f"{tick_off:.1f} | {tick_on:.1f} | | {tick_on / tick_off:.2f}x |",
    ]
    for key, what in (("underruns", "underruns"), ("achieved_hz", "achieved Hz"), ("jitter_ms_p99", "jitter p99, ms")):
        off_v, on_v = demo[OFF][key], demo[ON][key]
        lines.append(
            f"| `robots.run` 50 Hz on `pi05_demo`, {loop_s:g} s, two runs each: {what} | | "
            f"{', '.join(f'{v:g}' for v in off_v)} | {', '.join(f'{v:g}' for v in on_v)} | | |"
        )
    lines += [
        "",
        f"Rerun items dropped in the tick-cost loops (queue full): {tick['dropped'][0]:g}; by the demo runs: "
        f"{', '.join(str(v) for v in demo[ON].get('rerun_dropped', []))}.",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--ticks", type=int, default=5000)
    p.add_argument("--loop-s", type=float, default=20.0)
    p.add_argument("--baseline", default=BASELINE_REVISION, help="the revision whose server is the baseline")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    body = run(a.iters, a.rounds, a.ticks, a.loop_s, a.baseline)
    command = (
        f"python -m bench.observability --iters {a.iters} --rounds {a.rounds} --ticks {a.ticks} --loop-s {a.loop_s:g}"
    )
    packages = ("jax", "pyzmq", "prometheus-client", "rerun-sdk")
    print(write_section("observability", "Metrics and Rerun: their cost", body, command, packages))


if __name__ == "__main__":
    main()
