"""`python -m runtime.policy_server`: one process serving Pi0.5 to many robots.

Start-up binds every endpoint first (a port problem is reported in under a second), then loads the
weights, then starts serving and logs `ready`. The ZMQ ROUTER and XPUB live in this process beside
the engine; each WebSocket protocol (the JSON API, openpi's) runs in a gateway process of its own
(`runtime.gateway`) that reaches the engine through an internal ROUTER, so parsing a client's
JSON never stalls a robot. A port of 0 disables that endpoint. SIGINT or SIGTERM stop the server
within about a second, even while it compiles; a second one exits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import zmq

from configs import (
    DEFAULT_IMAGE_RESOLUTIONS,
    DEFAULT_MODEL,
    DEMO_MODEL,
    SHIPPED_CHECKPOINTS,
    model_config_names,
)
from robots.adapters import ADAPTERS
from runtime.cli_args import LOG_LEVELS, loopback, port, positive, tcp_endpoint
from runtime.fleet.front import add_fleet_arguments, check_fleet_arguments, is_front, join_link, serve_front
from runtime.gateway.supervisor import GatewayProcess
from runtime.policy_server.service import InferenceBackend, PolicyService, ServiceLimits
from runtime.serving import cancel_on_close, endpoints, gateway_argv, listen, model_label, run_demo, until_stopped
from transport import curve, logs
from transport.supervise import supervise
from transport.ws_common import read_token, tls_context
from transport.zmq_server import ZmqServer, ZmqServerSettings

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runtime.policy_server", description=__doc__.splitlines()[0])
    p.add_argument(
        "--config",
        default=None,
        help=f"model config: {', '.join(model_config_names())} (default: {DEFAULT_MODEL}; with --demo {DEMO_MODEL})",
    )
    p.add_argument(
        "--checkpoint",
        default=None,
        help="openpi checkpoint dir or URL (gs://...; default: the config's shipped one, else random weights)",
    )
    p.add_argument(
        "--random-weights", action="store_true", help="random weights even where the config ships a checkpoint"
    )
    p.add_argument("--tokenizer", default=None, help="PaliGemma SentencePiece file or URL (default: fetched)")
    p.add_argument(
        "--norm-stats", default=None, help="norm_stats.json or assets/<id>/ folder, path or URL (default: checkpoint's)"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind every endpoint to")
    p.add_argument("--router-port", type=port, default=5555, help="ZMQ ROUTER for requests (0: off)")
    p.add_argument("--pub-port", type=port, default=5556, help="ZMQ PUB for subtask refreshes (0: off)")
    p.add_argument("--ws-port", type=port, default=8765, help="JSON WebSocket API (0: off)")
    p.add_argument("--openpi-port", type=port, default=8000, help="openpi msgpack WebSocket protocol (0: off)")
    p.add_argument(
        "--openpi-layout", choices=sorted(ADAPTERS), default="droid", help="robot layout of openpi observations"
    )
    p.add_argument("--default-prompt", default=None, help="prompt for openpi observations that carry none")
    p.add_argument("--gpu-id", type=int, default=None, help="index into jax.devices()")
    p.add_argument("--max-batch", type=positive(int), default=8, help="most requests batched into one model call")
    p.add_argument("--batch-window-ms", type=float, default=3.0, help="how long to wait for a batch to fill")
    p.add_argument(
        "--rtc-method",
        choices=("vjp", "identity"),
        default="vjp",
        help="real-time chunking's guidance: exact VJP through the action expert, or the identity approximation",
    )
    p.add_argument(
        "--image-resolutions",
        type=resolutions,
        default=DEFAULT_IMAGE_RESOLUTIONS,
        help="camera resolutions HxW,... prepared ahead of time; the largest bounds WebSocket messages",
    )
    p.add_argument("--deadline", type=positive(float), default=5.0, help="seconds a request may wait for the model")
    p.add_argument("--max-queue", type=positive(int), default=256, help="requests queued for the model (more: busy)")
    p.add_argument("--max-sessions", type=positive(int), default=1024, help="robot sessions held in all")
    p.add_argument(
        "--max-sessions-per-peer",
        type=positive(int),
        default=64,
        help="robot sessions per client: its CURVE key, else its address (past it, its least recent session ends)",
    )
    p.add_argument(
        "--min-refresh-interval", type=positive(float), default=0.1, help="shortest subtask refresh interval, seconds"
    )
    p.add_argument("--session-ttl", type=positive(float), default=600.0, help="seconds of silence that end a session")
    p.add_argument("--max-ws-connections", type=positive(int), default=64, help="connections per WebSocket port")
    p.add_argument(
        "--max-ws-connections-per-client",
        type=positive(int),
        default=16,
        help="connections per WebSocket port from one client address",
    )
    p.add_argument(
        "--curve-secret", default=None, metavar="FILE", help="the server's CURVE .key_secret: ZMQ needs CURVE keys"
    )
    p.add_argument(
        "--curve-clients", default=None, metavar="DIR", help="with --curve-secret: client public keys (*.key) let in"
    )
    p.add_argument(
        "--token-file", default=None, metavar="FILE", help="WebSocket clients must send this token at the handshake"
    )
    p.add_argument("--tls-cert", default=None, metavar="FILE", help="PEM certificate chain: WebSocket ports are wss://")
    p.add_argument("--tls-key", default=None, metavar="FILE", help="with --tls-cert: its PEM private key")
    p.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="a browser Origin let in on the WebSocket ports, e.g. https://lab.example (repeatable; others: 403)",
    )
    p.add_argument(
        "--fixed-reply",
        action="store_true",
        help="no model: check each request and answer a fixed chunk of zeros (wiring and transport tests)",
    )
    p.add_argument(
        "--fixed-reply-delay",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="with --fixed-reply: answer after this long, as a model would (default 0)",
    )
    p.add_argument("--demo", action="store_true", help="also drive the simulated arm through the ZMQ endpoints")
    p.add_argument(
        "--demo-duration", type=float, default=None, help="seconds of demo, then exit (default: until Ctrl-C)"
    )
    p.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default="INFO")
    add_fleet_arguments(p)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.demo and not (args.router_port and args.pub_port):
        parser.error("--demo drives the robot through the ZMQ endpoints: --router-port and --pub-port must not be 0")
    if bool(args.curve_secret) != bool(args.curve_clients):
        parser.error("--curve-secret and --curve-clients go together")
    if args.demo and args.curve_secret:
        parser.error("--demo runs without keys: it cannot be combined with --curve-secret")
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    if args.fixed_reply_delay and not args.fixed_reply:
        parser.error("--fixed-reply-delay goes with --fixed-reply")
    if not 0 <= args.fixed_reply_delay <= 60:
        parser.error("--fixed-reply-delay must be between 0 and 60 seconds")
    check_fleet_arguments(parser, args, sys.argv[1:] if argv is None else list(argv))
    if args.random_weights and args.checkpoint:
        parser.error("--random-weights and --checkpoint contradict each other")
    if args.config is None:
        # The demo shows the policy trained on its task unless random weights are asked for.
        args.config = DEMO_MODEL if args.demo and not args.random_weights else DEFAULT_MODEL
        if args.worker_argv:
            args.worker_argv += ["--config", args.config]
    if args.checkpoint is None and not args.random_weights and args.config in SHIPPED_CHECKPOINTS:
        args.checkpoint = str(SHIPPED_CHECKPOINTS[args.config])
    return args


def _check_access(args: argparse.Namespace) -> curve.ServerKeys | None:
    """Loads the keys, token and certificate now (a bad file is a one-line error before anything
    binds) and warns about what is exposed beyond this host; the server's CURVE keys, if any."""
    keys = curve.load_server_keys(args.curve_secret, args.curve_clients) if args.curve_secret else None
    if keys is not None:
        log.info("CURVE on the ZMQ endpoints: %d client keys allowed from %s", keys.clients, keys.clients_dir)
    if args.token_file:
        read_token(args.token_file)
    if args.tls_cert:
        tls_context(args.tls_cert, args.tls_key)
    if loopback(args.host):
        return keys
    if keys is None and (args.router_port or args.pub_port):
        log.warning(
            "the ZMQ endpoints on %s are open to anyone who can reach them: use --curve-secret and --curve-clients",
            args.host,
        )
    websockets = args.ws_port or args.openpi_port
    if websockets and not args.token_file:
        log.warning("the WebSocket ports on %s are open to anyone who can reach them: use --token-file", args.host)
    elif websockets and not args.tls_cert:
        log.warning("the WebSocket token travels in clear on %s: use --tls-cert and --tls-key", args.host)
    return keys


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


def make_engine(args: argparse.Namespace) -> Any:
    from policy.engine.inference import AsyncPi05Inference

    return AsyncPi05Inference(
        config_name=args.config,
        gpu_id=args.gpu_id,
        checkpoint_dir=args.checkpoint,
        tokenizer_path=args.tokenizer,
        norm_stats=args.norm_stats,
        max_batch=args.max_batch,
        batch_buckets=(1, 2, 4, 8, 16, 32),  # the engine keeps those up to max_batch, and max_batch
        batch_window_ms=args.batch_window_ms,
        deadline_s=args.deadline,
        max_queue=args.max_queue,
        image_resolutions=args.image_resolutions,
        rtc_method=args.rtc_method,
    )


async def serve(
    args: argparse.Namespace,
    backend: InferenceBackend | None = None,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[dict[str, str]], None] | None = None,
) -> None:
    """Runs until `stop` is set (or a signal arrives). `backend` replaces the engine (benchmarks)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():  # the second Ctrl-C: no more waiting
            os._exit(130)
        log.info("stopping (again to exit at once)")
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, on_signal)
    ipc_dir = tempfile.mkdtemp(prefix="pi05-")
    closers: list[Callable[[], Awaitable[Any]]] = []
    sockets: dict[str, socket.socket] = {}
    try:
        curve_keys = _check_access(args)
        if is_front(args):  # a broker here, the engines in worker processes
            await serve_front(args, ipc_dir, curve_keys, stop, closers, sockets, on_ready)
            return
        gateways = {name: p for name, p in (("json", args.ws_port), ("openpi", args.openpi_port)) if p}
        pub_endpoints = [f"ipc://{ipc_dir}/pub"] + ([tcp_endpoint(args.host, args.pub_port)] if args.pub_port else [])
        if args.join:  # a fleet worker binds nothing: it reaches its broker, which gateways reach
            pub_endpoints = []
        zmq_server = ZmqServer(
            ZmqServerSettings(
                router_endpoint=tcp_endpoint(args.host, args.router_port) if args.router_port else None,
                internal_endpoint=None if args.join else f"ipc://{ipc_dir}/router",
                pub_endpoints=tuple(pub_endpoints),
                curve=curve_keys,
            ),
            lambda peer, request: service.handle(peer.principal, request, peer.user),
        )
        zmq_server.bind()
        closers.append(zmq_server.close)
        link = join_link(args, zmq_server) if args.join else None  # a fleet worker: requests come from a broker
        for name, ws_port in gateways.items():
            sockets[name] = listen(args.host, ws_port)
        found = endpoints(args, zmq_server, sockets)
        for name, endpoint in found.items():
            log.info("%s endpoint: %s", name, endpoint)
        log.info("model: %s", model_label(args))

        if backend is None and args.fixed_reply:
            from runtime.policy_server.fixed_backend import FixedBackend

            backend = FixedBackend(args.config, args.image_resolutions, args.fixed_reply_delay)
        if backend is None:
            from policy.engine import jax_setup

            jax_setup.configure()  # process-wide, before the engine starts JAX (and after binding: fast errors)
        engine = backend or make_engine(args)
        if backend is None:
            closers.append(engine.close)
            if not await until_stopped(engine.start(), stop):
                return
        service = PolicyService(
            engine,
            (link or zmq_server).publish,
            (link or zmq_server).subscribers,
            (link or zmq_server).forget,
            ServiceLimits(
                max_sessions=args.max_sessions,
                max_sessions_per_peer=args.max_sessions_per_peer,
                min_refresh_interval_s=args.min_refresh_interval,
                session_ttl_s=args.session_ttl,
            ),
        )
        closers.append(service.close)
        await zmq_server.start()
        if link is not None:
            closers.append(link.close)
            await link.start(service)
            if not await until_stopped(link.acked.wait(), stop):
                return
        closers.append(cancel_on_close(asyncio.create_task(supervise("session-expiry", service.run_expiry))))
        for name, sock in sockets.items():
            gateway = GatewayProcess(name, sock, gateway_argv(args, name, zmq_server, ipc_dir))
            closers.append(gateway.close)
            if not await until_stopped(gateway.start(), stop):
                return
        log.info("ready")
        if on_ready is not None:
            on_ready(found)
        if args.demo:
            if backend is None:
                # Compiles running beside the robot's loop would starve it on a small CPU.
                log.info("the demo starts once every batch bucket is compiled")
                if not await until_stopped(engine.wait_until_compiled(), stop):
                    return
            await run_demo(args, found, stop, closers)
        await stop.wait()
        log.info("shutting down")
    finally:
        for close in reversed(closers):
            try:
                await close()
            except Exception:
                log.exception("error while shutting down")
        for sock in sockets.values():
            sock.close()
        shutil.rmtree(ipc_dir, ignore_errors=True)
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(sig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # A fleet worker's lines name it (and its `ready` is not its front host's, which shares the log).
    who = f"%(name)s@{args.worker_name or 'worker'}" if args.join else "%(name)s"
    logs.configure(args.log_level, f"%(asctime)s %(levelname)s {who}: %(message)s")
    logging.getLogger(__name__).setLevel(logging.WARNING)
    try:
        asyncio.run(serve(args))
    except zmq.ZMQError as e:
        log.error("cannot bind a ZMQ endpoint on %s: %s", args.host, e)
        log.debug("traceback", exc_info=True)
        return 2
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            log.error("%s", e)
        else:  # an address in use, or one this host does not have
            log.error("cannot bind an endpoint on %s: %s", args.host, e)
        log.debug("traceback", exc_info=True)
        return 2
    except (ValueError, KeyError) as e:
        log.error("%s", e)
        log.debug("traceback", exc_info=True)
        return 2
    except RuntimeError as e:  # a checkpoint, tokenizer or norm stats location that cannot be fetched
        log.error("%s", e)
        log.debug("traceback", exc_info=True)
        return 2
    except Exception as e:
        log.error("the server failed: %s: %s", type(e).__name__, e)
        log.debug("traceback", exc_info=True)
        return 1
    return 0


def exit_process(code: int) -> None:
    """Exits; stopped while loading or compiling, without waiting for the compile to finish (its
    threads are daemons, and interpreter teardown under a running XLA compile can hang)."""
    busy = [t.name for t in threading.enumerate() if t.daemon and t.name.startswith("pi05-")]
    if busy:
        log.info("exiting without waiting for %s", ", ".join(busy))
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
