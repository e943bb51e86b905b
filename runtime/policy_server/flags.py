"""The policy server's command line: every option once, marked for where it applies (`runtime.cli_args`).

A single server takes all of them; a front host (`--workers`, `--gpu-ids`) keeps the `FRONT` ones and
hands its workers the parsed values of the `BOTH` ones (`worker_argv`); a worker (`--join`) also takes
its own `WORKER` ones, which whoever starts it sets. Parsing checks the combinations and changes no
value afterwards: what is derived (the checkpoint a config ships with) is computed where it is used.
"""

from __future__ import annotations

import argparse
import os

from configs import DEFAULT_IMAGE_RESOLUTIONS, DEMO_MODEL, get_model_config, model_config_names
from robots.adapters import ADAPTERS
from runtime import cli_args
from runtime.cli_args import (
    CURVE_CLIENTS,
    CURVE_SECRET,
    LOG_LEVEL,
    READY_FILE,
    WORKER_CURVE_CLIENTS,
    WORKER_CURVE_SECRET,
    Option,
    Where,
    comma_list,
    int_list,
    port,
    positive,
)
from runtime.fleet.heartbeat import DEFAULT_INTERVAL_S
from runtime.rerun_sink import RERUN_ARGUMENT
from transport.zmq_requests import zmq_endpoint

FRONT, WORKER, BOTH = Where.FRONT, Where.WORKER, Where.BOTH


def resolutions(text: str) -> tuple[tuple[int, int], ...]:
    """`480x640,720x1280`: camera resolutions (height x width) to prepare ahead of time."""
    out = []
    for part in text.split(","):
        try:
            h, w = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} is not HEIGHTxWIDTH") from None
        if not (0 < h <= 4096 and 0 < w <= 4096):
            raise argparse.ArgumentTypeError(f"{part!r}: each side must be 1..4096 pixels")
        out.append((h, w))
    return tuple(out)


def config_name(text: str) -> str:
    """A named model config, checked at parsing: an unknown name is a usage error naming the closest
    and the known ones (before anything binds or loads, so no line about a model comes first)."""
    try:
        return get_model_config(text).name
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def join_endpoint(text: str) -> str:
    try:
        return zmq_endpoint(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _path(value: str) -> str:
    """A local path as a worker started elsewhere (its own working folder) must see it; URLs unchanged."""
    return value if "://" in value else os.path.abspath(value)


def _opt(flags: str, where: Where = BOTH, text=str, **settings) -> Option:
    return Option(tuple(flags.split()), settings, where, text)


MODEL = (
    _opt(
        "--config",
        type=config_name,
        default=DEMO_MODEL,
        help=f"model config: {', '.join(model_config_names())} (default: {DEMO_MODEL}, the trained demo policy)",
        metavar="NAME",
    ),
    _opt(
        "--checkpoint",
        text=_path,
        default=None,
        help="openpi checkpoint dir or URL (gs://...; default: the config's shipped one, else random weights)",
    ),
    _opt("--random-weights", action="store_true", help="random weights even where the config ships a checkpoint"),
    _opt("--tokenizer", text=_path, default=None, help="PaliGemma SentencePiece file or URL (default: fetched)"),
    _opt(
        "--norm-stats",
        text=_path,
        default=None,
        help="norm_stats.json or assets/<id>/ folder, path or URL (default: the checkpoint's)",
    ),
    _opt("--gpu-id", WORKER, type=int, default=None, help="index into jax.devices()"),
    _opt("--max-batch", type=positive(int), default=8, help="most requests batched into one model call"),
    _opt("--batch-window-ms", type=float, default=3.0, help="how long to wait for a batch to fill"),
    _opt(
        "--rtc-method",
        choices=("vjp", "identity"),
        default="vjp",
        help="real-time chunking's guidance: exact VJP through the action expert, or the identity approximation",
    ),
    _opt(
        "--image-resolutions",
        text=lambda v: ",".join(f"{h}x{w}" for h, w in v),
        type=resolutions,
        default=DEFAULT_IMAGE_RESOLUTIONS,
        help="camera resolutions HxW,... prepared ahead of time; the largest bounds WebSocket messages",
    ),
    _opt("--deadline", type=positive(float), default=5.0, help="seconds a request may wait for the model"),
    _opt("--max-queue", type=positive(int), default=256, help="requests queued for the model (more: busy)"),
    _opt(
        "--fixed-reply",
        action="store_true",
        help="no model: check each request and answer a fixed chunk of zeros (wiring and transport tests)",
    ),
    _opt(
        "--fixed-reply-delay",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="with --fixed-reply: answer after this long, as a model would",
    ),
)
SESSIONS = (
    _opt("--max-sessions", type=positive(int), default=1024, help="robot sessions held in all"),
    _opt(
        "--max-sessions-per-peer",
        type=positive(int),
        default=64,
        help="robot sessions per client: its CURVE key, else its address (past it, its least recent session ends)",
    ),
    _opt(
        "--min-refresh-interval", type=positive(float), default=0.1, help="shortest subtask refresh interval, seconds"
    ),
    _opt("--session-ttl", type=positive(float), default=600.0, help="seconds of silence that end a session"),
)
ENDPOINTS = (
    _opt("--host", FRONT, default="127.0.0.1", help="address to bind every endpoint to"),
    _opt("--router-port", FRONT, type=port, default=5555, help="ZMQ ROUTER for requests (0: off)"),
    _opt("--pub-port", FRONT, type=port, default=5556, help="ZMQ PUB for subtask refreshes (0: off)"),
    _opt("--ws-port", FRONT, type=port, default=8765, help="JSON WebSocket API (0: off)"),
    _opt("--openpi-port", FRONT, type=port, default=8000, help="openpi msgpack WebSocket protocol (0: off)"),
    _opt(
        "--openpi-layout", FRONT, choices=sorted(ADAPTERS), default="droid", help="robot layout of openpi observations"
    ),
    _opt("--default-prompt", FRONT, default=None, help="prompt for openpi observations that carry none"),
    _opt("--max-ws-connections", FRONT, type=positive(int), default=64, help="connections per WebSocket port"),
    _opt(
        "--max-ws-connections-per-client",
        FRONT,
        type=positive(int),
        default=16,
        help="connections per WebSocket port from one client address",
    ),
    CURVE_SECRET,
    CURVE_CLIENTS,
    _opt(
        "--token-file",
        FRONT,
        default=None,
        metavar="FILE",
        help="WebSocket clients must send this token at the handshake",
    ),
    _opt("--tls-cert", FRONT, default=None, metavar="FILE", help="PEM certificate chain: WebSocket ports are wss://"),
    _opt("--tls-key", FRONT, default=None, metavar="FILE", help="with --tls-cert: its PEM private key"),
    _opt(
        "--allow-origin",
        FRONT,
        action="append",
        default=[],
        metavar="ORIGIN",
        help="a browser Origin let in on the WebSocket ports, e.g. https://lab.example (repeatable; others: 403)",
    ),
)
RUN = (
    cli_args.METRICS_PORT,
    Option(("--rerun",), RERUN_ARGUMENT, FRONT),
    _opt("--demo", FRONT, action="store_true", help="also drive the simulated arm through the ZMQ endpoints"),
    _opt("--demo-duration", FRONT, type=float, default=None, help="seconds of demo, then exit (default: until Ctrl-C)"),
    READY_FILE,
    LOG_LEVEL,
    cli_args.LOG_FORMAT,
)
FLEET = (
    _opt("--workers", FRONT, type=positive(int), default=None, help="front host: broker + N CPU worker processes"),
    _opt(
        "--gpu-ids",
        FRONT,
        text=comma_list,
        type=int_list("GPU indices"),
        default=(),
        help="front host: broker + one worker per GPU, e.g. 0,1,2,3",
    ),
    _opt("--worker-port", FRONT, type=port, default=0, help="front host: TCP port workers of other hosts join"),
    _opt(
        "--ray",
        FRONT,
        default=None,
        metavar="ADDRESS",
        help="front host: the workers are Ray actors on the cluster at ADDRESS: auto (this host's), "
        "ray://HOST:PORT, or local (start one here) (the ray extra)",
    ),
    _opt("--replicas", FRONT, type=positive(int), default=1, help="with --ray: worker replicas to start"),
    _opt("--cpus-per-replica", FRONT, type=positive(float), default=1.0, help="with --ray: CPUs Ray gives each"),
    _opt(
        "--gpus-per-replica",
        FRONT,
        type=float,
        default=0.0,
        help="with --ray: GPUs Ray gives each (0: a CPU replica, one XLA thread)",
    ),
    _opt("--min-replicas", FRONT, type=positive(int), default=None, help="with --ray: scale down to this many"),
    _opt("--max-replicas", FRONT, type=positive(int), default=None, help="with --ray: scale up to this many"),
    _opt(
        "--scale-wait-ms",
        FRONT,
        type=positive(float),
        default=500.0,
        help="with --ray: a median time at the workers above this, sustained, adds a replica",
    ),
    _opt("--scale-sustain-s", FRONT, type=positive(float), default=30.0, help="with --ray: ... for this long"),
    _opt(
        "--scale-idle-s",
        FRONT,
        type=positive(float),
        default=300.0,
        help="with --ray: a replica routed nothing this long is removed (above --min-replicas)",
    ),
    WORKER_CURVE_SECRET,
    WORKER_CURVE_CLIENTS,
    cli_args.heartbeat_option(DEFAULT_INTERVAL_S),
    _opt("--join", WORKER, type=join_endpoint, default=None, metavar="ENDPOINT", help="run as a worker of ENDPOINT"),
    _opt(
        "--join-curve-server-key",
        WORKER,
        default=None,
        metavar="FILE",
        help="with --join: the broker's public worker-side key",
    ),
    _opt("--join-curve-key", WORKER, default=None, metavar="FILE", help="with --join: this worker's .key_secret"),
    _opt("--worker-name", WORKER, default=None, help="this worker's name in the broker's ping (default host-pid)"),
    _opt("--capacity", WORKER, type=positive(int), default=1, help="this worker's share of robots, relative"),
    _opt(
        "--cpus",
        WORKER,
        type=int_list("CPU cores", lambda: sorted(os.sched_getaffinity(0))),
        default=None,
        help="pin this worker to these CPU cores, e.g. 0 or 0,1",
    ),
    _opt("--die-with-parent", WORKER, action="store_true", help=argparse.SUPPRESS),
)
OPTIONS = (*MODEL, *SESSIONS, *ENDPOINTS, *RUN, *FLEET)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m runtime.policy_server",
        description="One process serving Pi0.5 to many robots (ZMQ, the JSON WebSocket API, openpi's protocol).",
    )
    groups = (
        ("model", MODEL),
        ("sessions", SESSIONS),
        ("endpoints and access", ENDPOINTS),
        ("running", RUN),
        ("fleet (many workers behind one endpoint)", FLEET),
    )
    for title, options in groups:
        group = p.add_argument_group(title)
        for option in options:
            option.add_to(group)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    by_flag = {o.flags[0]: o for o in OPTIONS}
    cli_args.check_together(
        parser,
        args,
        *cli_args.CURVE_PAIRS,
        (by_flag["--tls-cert"], by_flag["--tls-key"]),
        (by_flag["--join-curve-server-key"], by_flag["--join-curve-key"]),
    )
    front = is_front(args)
    rules = (
        (args.demo and not (args.router_port and args.pub_port),
         "--demo drives the robot through the ZMQ endpoints: --router-port and --pub-port must not be 0"),
        (args.demo and args.curve_secret, "--demo runs without keys: it cannot be combined with --curve-secret"),
        (args.fixed_reply_delay and not args.fixed_reply, "--fixed-reply-delay goes with --fixed-reply"),
        (not 0 <= args.fixed_reply_delay <= 60, "--fixed-reply-delay must be between 0 and 60 seconds"),
        (args.random_weights and args.checkpoint, "--random-weights and --checkpoint contradict each other"),
        (args.workers and args.gpu_ids, "--workers (CPU workers) and --gpu-ids (GPU workers) exclude each other"),
        (args.ray and (args.workers or args.gpu_ids), "--ray runs the workers on Ray: not with --workers or --gpu-ids"),
        (not args.ray and _scaling_given(args, by_flag), "--replicas and the scaling flags go with --ray"),
        (args.ray and not (args.min_replicas or args.replicas) <= args.replicas <= (args.max_replicas or args.replicas),
         "with --ray: --min-replicas <= --replicas <= --max-replicas"),
        (args.ray and args.worker_curve_secret,
         "--ray makes the workers' keys itself: not with --worker-curve-secret"),
        (front and args.join, "--join makes this process a worker; --workers and --gpu-ids make it a front host"),
        (args.join and args.demo, "--demo needs the robot endpoints of a front host, not a worker's --join"),
        (front and args.rerun,
         "--rerun logs one engine's view: give it to a single server, a --join worker or robots.run"),
        (args.worker_curve_secret and not (front and args.worker_port),
         "--worker-curve-secret protects a front host's --worker-port (its own workers join over ipc://)"),
        (args.join_curve_key and not args.join,
         "--join-curve-server-key and --join-curve-key are a worker's: they go with --join"),
    )  # fmt: skip
    for broken, message in rules:
        if broken:
            parser.error(message)
    return args


def is_front(args: argparse.Namespace) -> bool:
    return bool(args.workers or args.gpu_ids or args.ray)


def _scaling_given(args: argparse.Namespace, by_flag: dict[str, cli_args.Option]) -> bool:
    """Whether a flag that only --ray reads was given a value other than its default."""
    ray_only = ("--replicas", "--cpus-per-replica", "--gpus-per-replica", "--min-replicas", "--max-replicas",
                "--scale-wait-ms", "--scale-sustain-s", "--scale-idle-s")  # fmt: skip
    return any(by_flag[f].argv(args) for f in ray_only)


def worker_argv(args: argparse.Namespace) -> list[str]:
    """A front host's workers' command line (after `--join`): the parsed model and serving values."""
    return cli_args.worker_argv(OPTIONS, args)
