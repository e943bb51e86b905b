"""`python -m runtime.policy_server`: one process serving Pi0.5 to many robots.

Start-up binds every endpoint first (a port problem is reported in under a second), then loads the
weights, then starts serving and says so: a `ready` log line naming the model, `--ready-file`'s JSON
and systemd's `READY=1` (`runtime.ready`). The command line is `runtime.policy_server.flags`.
The ZMQ ROUTER and XPUB live in this process beside the engine; each WebSocket protocol (the JSON
API, openpi's) runs in a gateway process of its own (`runtime.gateway`) that reaches the engine
through an internal ROUTER, so parsing a client's JSON never stalls a robot. A port of 0 disables
that endpoint. SIGINT or SIGTERM stop the server within about a second, even while it compiles; a
second one exits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable
from typing import Any

import zmq

from runtime.cli_args import loopback, tcp_endpoint
from runtime.fleet.front import join_link, serve_front
from runtime.policy_server.flags import is_front, parse_args, worker_argv
from runtime.policy_server.metrics import EngineMetrics, ServerCollector
from runtime.policy_server.rerun_log import ServerLog
from runtime.policy_server.service import InferenceBackend, PolicyService, ServiceLimits
from runtime.ready import Readiness
from runtime.request_metrics import RequestMetrics
from runtime.rerun_sink import RerunSink, RerunUnavailable
from runtime.serving import (
    cancel,
    checkpoint_of,
    endpoints,
    fan_out,
    listen_websockets,
    model_info,
    on_close,
    open_metrics,
    run_demo,
    start_gateways,
    until_stopped,
)
from transport import curve, logs
from transport.supervise import supervise
from transport.ws_common import read_token, tls_context
from transport.zmq_server import ZmqServer, ZmqServerSettings

log = logging.getLogger(__name__)


def check_access(args: argparse.Namespace) -> curve.ServerKeys | None:
    """Loads the keys, token and certificate now (a bad file is a one-line error before anything
    binds) and warns about what is exposed beyond this host; the server's CURVE keys, if any."""
    keys = curve.load_server_keys(args.curve_secret, args.curve_clients) if args.curve_secret else None
    if keys is not None:
        log.info("CURVE on the ZMQ endpoints: %d client keys allowed from %s", keys.clients, keys.clients_dir)
    if args.token_file:
        read_token(args.token_file)
    if args.tls_cert:
        tls_context(args.tls_cert, args.tls_key)
    if loopback(args.host) or args.join:
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


def make_engine(args: argparse.Namespace) -> Any:
    from policy.engine.inference import AsyncPi05Inference
    from policy.engine.settings import EngineSettings

    settings = EngineSettings(
        config_name=args.config,
        gpu_id=args.gpu_id,
        checkpoint_dir=checkpoint_of(args),
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
    return AsyncPi05Inference(settings)


def log_ready(args: argparse.Namespace, role: str, found: dict[str, str], model: dict[str, Any]) -> None:
    """The endpoints, then `ready` naming the model, its checkpoint and whether its weights are trained."""
    for name, endpoint in found.items():
        layout = f" (layout {args.openpi_layout})" if name == "openpi websocket" else ""
        log.info("%s endpoint: %s%s", name, endpoint, layout)
    weights = "none (fixed reply)" if args.fixed_reply else "trained" if model["trained"] else "random"
    log.info("ready (%s): %s; weights: %s", role, model["label"], weights)


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

    readiness = Readiness(args.ready_file)
    async with contextlib.AsyncExitStack() as stack:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, on_signal)
                stack.callback(loop.remove_signal_handler, sig)
        ipc_dir = tempfile.mkdtemp(prefix="pi05-")
        stack.callback(shutil.rmtree, ipc_dir, ignore_errors=True)
        stack.callback(readiness.stopping)
        curve_keys = check_access(args)
        if is_front(args):  # a broker here, the engines in worker processes
            announce = _announcer(args, readiness, "front host", on_ready)
            await serve_front(args, worker_argv(args), ipc_dir, curve_keys, stop, stack, announce)
            return
        await _serve_here(args, backend, ipc_dir, curve_keys, stop, stack, readiness, on_ready)


def _announcer(
    args: argparse.Namespace,
    readiness: Readiness,
    role: str,
    on_ready: Callable[[dict[str, str]], None] | None,
) -> Callable[..., None]:
    """What is done once everything serves: the log line, the ready file and systemd, `on_ready`;
    `announce(found, config)` names the config the engine serves (None: `--config`)."""

    def announce(found: dict[str, str], config: str | None = None) -> None:
        model = model_info(args, config)
        log_ready(args, role, found, model)
        readiness.ready({"role": role, "endpoints": found, "model": model})
        if on_ready is not None:
            on_ready(found)

    return announce


async def _serve_here(
    args: argparse.Namespace,
    backend: InferenceBackend | None,
    ipc_dir: str,
    curve_keys: curve.ServerKeys | None,
    stop: asyncio.Event,
    stack: contextlib.AsyncExitStack,
    readiness: Readiness,
    on_ready: Callable[[dict[str, str]], None] | None,
) -> None:
    """A single server, or a fleet worker (`--join`): the engine in this process."""
    worker = args.join is not None
    announce = _announcer(args, readiness, "worker" if worker else "server", on_ready)
    # A fleet worker binds nothing: it reaches its broker, which robots and gateways reach.
    pub_endpoints = [] if worker else [f"ipc://{ipc_dir}/pub"]
    if args.pub_port and not worker:
        pub_endpoints.append(tcp_endpoint(args.host, args.pub_port))
    metrics = open_metrics(args, stack)
    registry = metrics[0] if metrics else None
    server_log = _server_log(args, stack)  # before the model loads: a Rerun that cannot be had fails fast
    zmq_server = ZmqServer(
        ZmqServerSettings(
            router_endpoint=tcp_endpoint(args.host, args.router_port) if args.router_port and not worker else None,
            internal_endpoint=None if worker else f"ipc://{ipc_dir}/router",
            pub_endpoints=tuple(pub_endpoints),
            curve=curve_keys,
        ),
        lambda peer, request: service.handle(peer.principal, request, peer.user),
        RequestMetrics(registry).observe if registry else None,
    )
    zmq_server.bind()
    on_close(stack, zmq_server.close)
    link = join_link(args, zmq_server) if worker else None  # a fleet worker: requests come from a broker
    sockets = {} if worker else listen_websockets(args, stack)
    found = endpoints(args, zmq_server, sockets, metrics[1] if metrics else None)
    log.info("model: %s", model_info(args)["label"])

    if backend is None and args.fixed_reply:
        from runtime.policy_server.fixed_backend import FixedBackend

        backend = FixedBackend(args.config, args.image_resolutions, args.fixed_reply_delay)
    if backend is None:
        from policy.engine import jax_setup

        jax_setup.configure()  # process-wide, before the engine starts JAX (and after binding: fast errors)
    engine = backend or make_engine(args)
    if backend is None:
        on_close(stack, engine.close)
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
        on_result=fan_out(EngineMetrics(registry).observe if registry else None, server_log),
    )
    on_close(stack, service.close)
    await zmq_server.start()
    if link is not None:
        if backend is None:
            # The broker routes to a worker once it joins: joining warm means no robot waits for a
            # compile, and a front host's `ready` (every worker joined) means every worker serves.
            log.info("compiling every batch bucket before joining the broker")
            if not await until_stopped(engine.wait_until_compiled(), stop):
                return
        on_close(stack, link.close)
        await link.start(service)
        if not await until_stopped(link.acked.wait(), stop):
            return
    expiry = asyncio.create_task(supervise("session-expiry", service.run_expiry))
    on_close(stack, lambda: cancel(expiry))
    if registry is not None:
        registry.register(ServerCollector(service))
    if not await start_gateways(args, zmq_server, sockets, ipc_dir, stop, stack, registry):
        return
    announce(found, engine.info().get("config"))
    if args.demo:
        if backend is None:
            # Compiles running beside the robot's loop would starve it on a small CPU.
            log.info("the demo starts once every batch bucket is compiled")
            if not await until_stopped(engine.wait_until_compiled(), stop):
                return
        await run_demo(args, found, stop, stack)
    await stop.wait()
    log.info("shutting down")


def _server_log(args: argparse.Namespace, stack: contextlib.AsyncExitStack) -> ServerLog | None:
    """`--rerun`'s log of what the engine received and answered (None when off)."""
    if args.rerun is None:
        return None
    sink = RerunSink.open(args.rerun, root="server")
    on_close(stack, lambda: asyncio.to_thread(sink.close))
    return ServerLog(sink)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # A fleet worker's lines name it (and its `ready` is not its front host's, which shares the log).
    who = f"%(name)s@{args.worker_name or 'worker'}" if args.join else "%(name)s"  # workers share a log
    role = f"worker {args.worker_name or 'worker'}" if args.join else "front host" if is_front(args) else "server"
    logs.configure(args.log_level, f"%(asctime)s %(levelname)s {who}: %(message)s", args.log_format, role)
    if args.log_level != "DEBUG":  # absl's and JAX's start-up notes (the TPU probe) are not the server's news
        for noisy in ("absl", "jax", "gcsfs", "fsspec", "aiohttp", "google"):  # retries: our one line says it
            logging.getLogger(noisy).setLevel(logging.WARNING)
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
    except (ValueError, KeyError, RerunUnavailable) as e:
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
