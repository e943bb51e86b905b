"""`python -m robots.run`: a robot's control loop against a running policy server.

    python -m robots.run --robot sim --server 127.0.0.1:5555 --hz 50 --duration 10 --stats-json FILE

The simulated arm sets itself up from the server's `ping`: the model's cameras at its resolution,
the state and action sizes it takes, and the task it was trained on (`--task auto`), whose episodes
it then runs back to back (a new scene each, its prompt, until the simulator judges it done or
`--episode-s`). A flag that contradicts the model is one line naming the fix, exit code 2.

`--robot lerobot` drives a robot of LeRobot's (`--lerobot-type so101_follower --lerobot-port
/dev/ttyACM0 --lerobot-cameras '{front: {type: opencv, ...}}'`, the `lerobot` extra): its motor
positions are the model's state, its cameras fill the model's camera slots and its motors take the
model's first actions (`robots/lerobot_robot.py`); it is connected for the run and disconnected
after it, after an error or Ctrl-C too.

Writes the loop's summary as flat JSON keys: ticks, achieved_hz, jitter_ms_p50, jitter_ms_p99,
underruns, chunks_received, inference_delay_ms_p50, inference_delay_ms_p99, subtasks_seen, outages,
outage_s (time without service), server_restarts, episodes, episodes_succeeded (and a few more).
A server that cannot be reached is reported in `--connect-timeout` seconds, in one line; once
running, the loop rides through outages (holding the robot's safe action) and server restarts.

`--rerun spawn | connect HOST:PORT | save FILE.rrd` (the `rerun` extra) logs what the robot does to
Rerun, on its `step` and `time` timelines: the cameras as the model receives them, the state, each
chunk as planned, the actions as executed, the subtasks and the inference latency
(`runtime/rerun_sink.py`); the summary then adds `rerun_dropped`, the items Rerun could not take.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

from policy.request import SCHEDULES
from robots.lerobot_robot import LeRobotConnectError, LeRobotSetupError, fit_lerobot, make_lerobot_device
from robots.server_model import AUTO, NO_TASK, Mismatch, ServerModel, fit_sim
from robots.tasks import TASKS
from runtime.cli_args import LOG_FORMAT, port
from runtime.metrics_http import process_registry, serve_metrics
from runtime.rerun_sink import RerunSink, RerunUnavailable, add_rerun_argument
from runtime.robot.chunk_buffer import BLENDS, BufferSettings
from runtime.robot.control_loop import LoopSettings
from runtime.robot.episodes import EpisodeArm, TaskEpisodes
from runtime.robot.metrics import LoopMetrics
from runtime.robot.rerun_log import RobotLog
from runtime.robot.status_line import StatusLine
from transport import logs
from transport.curve import CurveError, load_client_keys
from transport.errors import TransportError
from transport.zmq_client import PolicyClient
from transport.zmq_requests import zmq_endpoint

log = logging.getLogger("robots.run")


def endpoint_arg(text: str) -> str:
    try:
        return zmq_endpoint(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m robots.run", description=__doc__.splitlines()[0])
    p.add_argument("--robot", choices=("sim", "lerobot"), default="sim", help="lerobot: a robot of LeRobot's")
    lerobot = p.add_argument_group("--robot lerobot", "LeRobot's robot config, as lerobot-record's --robot.* flags")
    lerobot.add_argument("--lerobot-type", default="so101_follower", help="its --robot.type (default: so101_follower)")
    lerobot.add_argument("--lerobot-port", default=None, help="its --robot.port, e.g. /dev/ttyACM0")
    lerobot.add_argument("--lerobot-id", default=None, help="its --robot.id: the name of its calibration")
    lerobot.add_argument(
        "--lerobot-cameras",
        default=None,
        help="its --robot.cameras, JSON or LeRobot's form: '{front: {type: opencv, index_or_path: 0, "
        "width: 640, height: 480, fps: 30}}'",
    )
    p.add_argument(
        "--server",
        type=endpoint_arg,
        default="tcp://127.0.0.1:5555",
        help="the server's ROUTER: host:port or tcp://...",
    )
    p.add_argument("--pub", type=endpoint_arg, default=None, help="the server's refresh PUB (default: ROUTER port + 1)")
    p.add_argument("--robot-id", default="sim-0")
    p.add_argument("--prompt", default=None, help="the prompt without a task (default: 'pick up the block')")
    p.add_argument(
        "--task",
        choices=(AUTO, NO_TASK, *TASKS),
        default=AUTO,
        help="the sim arm's task (auto: the one the server's model was trained on; none: a lone block, joint deltas)",
    )
    p.add_argument("--episode-s", type=float, default=15.0, help="a task episode that long ends unfinished")
    p.add_argument("--image-size", type=int, default=None, help="camera resolution (default: the server model's)")
    p.add_argument("--hz", type=float, default=50.0)
    p.add_argument("--duration", type=float, default=10.0, help="seconds")
    p.add_argument(
        "--blend", choices=BLENDS, default="crossfade", help="how a new chunk takes over (rtc: real-time chunking)"
    )
    p.add_argument("--crossfade-steps", type=int, default=8)
    p.add_argument(
        "--rtc-execute-horizon", type=int, default=25, help="rtc: steps executed per chunk (kept within d..H-d)"
    )
    p.add_argument("--rtc-schedule", choices=SCHEDULES, default=None, help="rtc: guidance weights (server default)")
    p.add_argument("--rtc-max-guidance-weight", type=float, default=None, help="rtc: beta (server default)")
    p.add_argument(
        "--request-when-left",
        type=int,
        default=None,
        help="the request trigger's floor: the next chunk is asked for with at least this many actions left, "
        "more when the measured delays call for it (default: half the model's chunk)",
    )
    p.add_argument("--subtask", choices=("off", "per_chunk", "refresh"), default="refresh")
    p.add_argument(
        "--refresh-interval",
        type=float,
        default=None,
        help="seconds between subtask refreshes (default: 0.5 with a task, whose phases change in a second; else 2)",
    )
    p.add_argument("--max-decoding-steps", type=int, default=12)
    p.add_argument(
        "--timeout", type=float, default=30.0, help="seconds the first chunk may take per try (the model may compile)"
    )
    p.add_argument(
        "--chunk-timeout", type=float, default=5.0, help="seconds after which a chunk request is abandoned and re-asked"
    )
    p.add_argument("--connect-timeout", type=float, default=3.0, help="seconds without a connection: unreachable")
    p.add_argument(
        "--curve-server-key", default=None, metavar="FILE", help="the server's public key (.key): connect with CURVE"
    )
    p.add_argument("--curve-key", default=None, metavar="FILE", help="with --curve-server-key: the robot's .key_secret")
    p.add_argument("--stats-json", type=Path, default=None, help="write the summary here")
    add_rerun_argument(p)
    p.add_argument("--metrics-port", type=port, default=0, help="Prometheus /metrics of the loop at this port (0: off)")
    p.add_argument("--metrics-host", default="127.0.0.1", help="address the metrics endpoint binds to")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"), type=str.upper)
    LOG_FORMAT.add_to(p)
    return p


def default_pub(router: str) -> str:
    host, _, port = router.rpartition(":")
    return f"{host}:{int(port) + 1}"


def loop_settings(args: argparse.Namespace, model: ServerModel, task: str | None) -> LoopSettings:
    """The loop as the flags say; the prompt and the safe action are the arm's (`TaskEpisodes`)."""
    return LoopSettings(
        prompt=args.prompt or "pick up the block",
        hz=args.hz,
        buffer=BufferSettings(
            request_when_left=model.action_horizon // 2 if args.request_when_left is None else args.request_when_left,
            blend=args.blend,
            crossfade_steps=args.crossfade_steps,
            rtc_execute_horizon=args.rtc_execute_horizon,
            rtc_schedule=args.rtc_schedule,
            rtc_max_guidance_weight=args.rtc_max_guidance_weight,
        ),
        subtask_mode=args.subtask,
        refresh_interval_s=args.refresh_interval or (0.5 if task is not None else 2.0),
        max_decoding_steps=args.max_decoding_steps,
        request_timeout_s=args.chunk_timeout,
    )


def fit_robot(
    args: argparse.Namespace, model: ServerModel
) -> tuple[EpisodeArm, str | None, contextlib.AbstractContextManager[object]]:
    """The robot `--robot` names, set up for the server's model, its task, and what brackets its
    run: a LeRobot robot is connected for it (the sim arm needs nothing). Raises `Mismatch` when
    the robot cannot drive the model, `LeRobotSetupError` when LeRobot's robot cannot be made."""
    if args.robot == "lerobot":
        device = make_lerobot_device(args.lerobot_type, args.lerobot_port, args.lerobot_id, args.lerobot_cameras)
        robot = fit_lerobot(device, model, args.hz)
        return robot, None, robot.connected()
    arm, task = fit_sim(model, args.task, args.image_size, args.hz, args.seed)
    log.info(
        "the sim arm, set up for %s: task %s, cameras %s at %dx%d, state %d, actions %d",
        model.label, task or "none", ", ".join(arm.cameras), arm.image_size, arm.image_size,
        arm.state.shape[0], arm.action_dim,
    )  # fmt: skip
    return arm, task, contextlib.nullcontext()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if bool(args.curve_server_key) != bool(args.curve_key):
        parser.error("--curve-server-key and --curve-key go together")
    try:
        keys = load_client_keys(args.curve_server_key, args.curve_key) if args.curve_key else None
    except CurveError as e:
        parser.error(str(e))
    logs.configure(args.log_level, "%(asctime)s %(levelname)s %(name)s: %(message)s", args.log_format, "robot")

    def client() -> PolicyClient:
        return PolicyClient(
            args.server, args.robot_id, timeout_s=args.timeout, connect_timeout_s=args.connect_timeout, keys=keys
        )

    try:
        with client() as probe:
            model = ServerModel.from_ping(probe.ping())
        arm, task, session = fit_robot(args, model)
    except TransportError as e:
        print(f"robots.run: error: {e}", file=sys.stderr)
        return 1
    except (Mismatch, LeRobotSetupError) as e:
        print(f"robots.run: {e}", file=sys.stderr)
        return 2
    if task is not None and args.prompt is not None:
        log.warning("--prompt is not used: each %s scene says its own", task)
    try:
        sink = RerunSink.open(args.rerun) if args.rerun is not None else None
    except RerunUnavailable as e:
        print(f"robots.run: {e}", file=sys.stderr)
        return 2
    try:
        registry = process_registry() if args.metrics_port else None
        endpoint = serve_metrics(registry, args.metrics_host, args.metrics_port) if registry is not None else None
    except OSError as e:
        if sink is not None:
            sink.close()
        print(f"robots.run: cannot bind the metrics endpoint on {args.metrics_host}: {e}", file=sys.stderr)
        return 2
    status = StatusLine(model.label)
    show = status if task is not None else lambda st, _: status(st)
    metrics = LoopMetrics(registry) if registry is not None else None
    episodes = TaskEpisodes(
        arm, client, loop_settings(args, model, task), args.pub or default_pub(args.server), args.episode_s,
        on_tick=show if metrics is None else lambda st, tally: (show(st, tally), metrics(st)),
        rerun=None if sink is None else RobotLog(
            sink, args.robot_id, model.input_resolution[0] if model.input_resolution else None
        ),
    )  # fmt: skip
    try:
        with session, _sigterm_stops(episodes):
            try:
                summary = episodes.run(args.duration)
            except KeyboardInterrupt:
                summary = episodes.summary()
    except (TransportError, LeRobotConnectError) as e:
        status.close()
        print(f"robots.run: error: {e}", file=sys.stderr)
        return 1
    finally:
        if sink is not None:
            sink.close()
        if endpoint is not None:
            endpoint.close()
    status.close()
    if sink is not None:
        summary["rerun_dropped"] = sink.dropped
    log.info("summary: %s", summary)
    if task is not None:
        print(
            f"robots.run: {task}: {summary['episodes_succeeded']} of {summary['episodes']} episodes done; "
            f"underruns {summary['underruns']}, chunks {summary['chunks_received']}",
            file=sys.stderr,
        )
    if args.stats_json is not None:
        args.stats_json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


@contextlib.contextmanager
def _sigterm_stops(episodes: TaskEpisodes) -> Iterator[None]:
    """While running, SIGTERM ends the loop as Ctrl-C does: it signs off from the server first."""
    try:
        previous = signal.signal(signal.SIGTERM, lambda *_: episodes.stop())
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
