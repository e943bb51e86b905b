"""`python -m robots.run`: a robot's control loop against a running policy server.

    python -m robots.run --robot sim --server tcp://127.0.0.1:5555 --hz 50 --duration 10 --stats-json FILE

Writes the loop's summary as flat JSON keys: ticks, achieved_hz, jitter_ms_p50, jitter_ms_p99,
underruns, chunks_received, inference_delay_ms_p50, inference_delay_ms_p99, subtasks_seen (and a
few more).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from robots.sim import SimArm
from runtime.chunk_buffer import BufferSettings
from runtime.control_loop import ControlLoop, LoopSettings
from transport.zmq_client import PolicyClient

log = logging.getLogger("robots.run")

ROBOTS = {"sim": SimArm}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m robots.run", description=__doc__.splitlines()[0])
    p.add_argument("--robot", choices=sorted(ROBOTS), default="sim")
    p.add_argument("--server", default="tcp://127.0.0.1:5555", help="the server's ROUTER endpoint")
    p.add_argument("--pub", default=None, help="the server's refresh PUB endpoint (default: ROUTER port + 1)")
    p.add_argument("--robot-id", default="sim-0")
    p.add_argument("--prompt", default="pick up the block")
    p.add_argument("--hz", type=float, default=50.0)
    p.add_argument("--duration", type=float, default=10.0, help="seconds")
    p.add_argument("--blend", choices=("replace", "crossfade", "average"), default="crossfade")
    p.add_argument("--crossfade-steps", type=int, default=8)
    p.add_argument("--request-when-left", type=int, default=20, help="actions left when the next chunk is requested")
    p.add_argument("--subtask", choices=("off", "per_chunk", "refresh"), default="refresh")
    p.add_argument("--refresh-interval", type=float, default=2.0, help="seconds between subtask refreshes")
    p.add_argument("--max-decoding-steps", type=int, default=12)
    p.add_argument("--timeout", type=float, default=30.0, help="per-request timeout, seconds")
    p.add_argument("--stats-json", type=Path, default=None, help="write the summary here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-level", default="INFO")
    return p


def default_pub(router: str) -> str:
    host, _, port = router.rpartition(":")
    return f"{host}:{int(port) + 1}"


def loop_settings(args: argparse.Namespace) -> LoopSettings:
    return LoopSettings(
        prompt=args.prompt,
        hz=args.hz,
        buffer=BufferSettings(
            request_when_left=args.request_when_left, blend=args.blend, crossfade_steps=args.crossfade_steps
        ),
        subtask_mode=args.subtask,
        refresh_interval_s=args.refresh_interval,
        max_decoding_steps=args.max_decoding_steps,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    robot = ROBOTS[args.robot](control_hz=args.hz, seed=args.seed)
    with PolicyClient(args.server, args.robot_id, timeout_s=args.timeout) as client:
        loop = ControlLoop(robot, client, loop_settings(args), pub_endpoint=args.pub or default_pub(args.server))
        try:
            summary = loop.run(args.duration)
        except KeyboardInterrupt:
            summary = loop.summary()
    log.info("summary: %s", summary)
    if args.stats_json is not None:
        args.stats_json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
