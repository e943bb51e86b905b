"""A 50 Hz control loop of the simulated arm against the tiny model on this machine.

Runs the server (real engine, real ZMQ endpoints on 127.0.0.1) and the robot's loop in one
process, for each blending mode, and reports achieved rate, tick jitter, underruns and chunk
latency. The baseline in the same run is the same loop with one request in flight at a time
(openpi's `ActionChunkBroker`-like pacing, but asynchronous): its row shows what pipelining buys.
"""

from __future__ import annotations

import argparse
import asyncio
import logging

from bench.report import write_section
from policy.engine.inference import AsyncPi05Inference
from policy.engine.settings import EngineSettings
from robots.sim import SimArm
from runtime.robot.chunk_buffer import BufferSettings
from runtime.robot.control_loop import ControlLoop, LoopSettings
from tests.support.ports import free_local_ports
from tests.support.server_thread import ServerThread
from transport.zmq_client import PolicyClient


def run(config: str, duration_s: float, hz: float, request_when_left: int) -> str:
    router, pub = free_local_ports(2)
    argv = ["--config", config, "--router-port", str(router), "--pub-port", str(pub), "--ws-port", "0",
            "--openpi-port", "0", "--log-level", "WARNING"]  # fmt: skip
    cases = [
        ("crossfade, 1 in flight (baseline)", "crossfade", 1),
        ("crossfade, 2 in flight", "crossfade", 2),
        ("average, 2 in flight", "average", 2),
        ("replace, 2 in flight", "replace", 2),
    ]
    rows = []
    # Every batch bucket compiled before the clock starts: no compile competes with the loops.
    engine = AsyncPi05Inference(EngineSettings(config, compile_in_background=False))
    asyncio.run(engine.start())
    with ServerThread(argv, backend=engine) as server:
        for name, blend, in_flight in cases:
            settings = LoopSettings(
                hz=hz,
                buffer=BufferSettings(request_when_left=request_when_left, blend=blend),
                max_in_flight=in_flight,
                subtask_mode="refresh",
                refresh_interval_s=2.0,
                max_decoding_steps=8,
            )
            with PolicyClient(server.endpoints["router"], f"bench-{blend}-{in_flight}") as client:
                s = ControlLoop(SimArm(control_hz=hz), client, settings, server.endpoints["pub"]).run(duration_s)
            rows.append(
                f"| {name} | {s['achieved_hz']:.2f} | {s['jitter_ms_p50']:.3f} | {s['jitter_ms_p99']:.3f} | "
                f"{s['underruns']} | {s['chunks_received']} | {s['inference_delay_ms_p50']:.0f} | "
                f"{s['inference_delay_ms_p99']:.0f} | {s['subtasks_seen']} |"
            )
    asyncio.run(engine.close())
    body = (
        f"Config `{config}` on CPU, simulated arm at {hz:g} Hz for {duration_s:g} s per row, next chunk requested "
        f"at {request_when_left} actions left, subtask refreshed every 2 s.\n\n"
        "| loop | achieved Hz | jitter p50 ms | jitter p99 ms | underruns | chunks | chunk latency p50 ms | "
        "p99 ms | subtasks seen |\n|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    command = f"python -m bench.control_loop --config {config} --duration {duration_s:g} --hz {hz:g}"
    return write_section("control_loop", "Control loop at 50 Hz", body, command, packages=("jax", "pyzmq"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="pi05_tiny")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--hz", type=float, default=50.0)
    parser.add_argument("--request-when-left", type=int, default=25)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(run(args.config, args.duration, args.hz, args.request_when_left))


if __name__ == "__main__":
    main()
