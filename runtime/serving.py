"""What the single policy server and a fleet's front host both do around their sockets: bind the
WebSocket ports, name the endpoints and the model, start the gateways with their flags, run the
demo, signal readiness, and wait for work unless told to stop.

Both `runtime.policy_server.main` and `runtime.fleet.front` use it; neither imports the other's internals.
`server` below is the `ZmqServer` of a single server or the `Broker` of a front host: both have a
`router_endpoint`, `pub_endpoints` and an `internal_endpoint` for the gateways. What they start is
closed by the caller's `contextlib.AsyncExitStack`, in reverse order, each close logged if it fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from configs import SHIPPED_CHECKPOINTS, get_model_config
from runtime.gateway.metrics import GatewayCollector
from runtime.gateway.supervisor import GatewayProcess
from runtime.metrics_http import MetricsEndpoint, process_registry, serve_metrics

log = logging.getLogger(__name__)


def checkpoint_of(args: argparse.Namespace) -> str | None:
    """The checkpoint served: `--checkpoint`, else the one the config ships with (unless
    `--random-weights`), else none (random weights)."""
    if args.checkpoint or args.random_weights:
        return args.checkpoint
    shipped = SHIPPED_CHECKPOINTS.get(args.config)
    return str(shipped) if shipped is not None else None


def model_info(args: argparse.Namespace, config: str | None = None) -> dict[str, Any]:
    """Which model answers, for the `ready` line, the ready file and the demo's status line. `config`
    is the one the engine serves once loaded: a PyTorch checkpoint brings its own (LeRobot's
    `config.json`), whatever `--config` says."""
    checkpoint = checkpoint_of(args)
    shipped = SHIPPED_CHECKPOINTS.get(args.config)
    trained = checkpoint is not None and not args.fixed_reply
    if args.fixed_reply:
        label = f"{args.config}: fixed reply, no model"
    elif checkpoint is None:
        label = f"{args.config}: random weights"
    elif shipped is not None and Path(checkpoint) == shipped:
        label = f"{args.config}: trained demo policy ({checkpoint})"
    elif config is None:  # not loaded yet: its own files may name another config than --config
        label = f"checkpoint {checkpoint}"
    else:
        label = f"{config}: checkpoint {checkpoint}"
    return {"config": config or args.config, "checkpoint": checkpoint, "trained": trained, "label": label}


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket, bound now; a gateway process inherits it."""
    sock = socket.create_server((host, port), backlog=128)
    sock.set_inheritable(True)
    return sock


def listen_websockets(args: argparse.Namespace, stack: contextlib.AsyncExitStack) -> dict[str, socket.socket]:
    """The WebSocket ports that are on (`--ws-port`, `--openpi-port`), bound now, by gateway name."""
    sockets = {}
    for name, port in (("json", args.ws_port), ("openpi", args.openpi_port)):
        if port:
            sockets[name] = stack.enter_context(contextlib.closing(listen(args.host, port)))
    return sockets


def on_close(stack: contextlib.AsyncExitStack, close: Callable[[], Awaitable[Any]]) -> None:
    """`close` runs when `stack` unwinds; a failure is logged and the other closes still run, so one
    stuck part cannot keep a port or a device held."""

    async def logged() -> None:
        try:
            await close()
        except Exception:
            log.exception("error while shutting down")

    stack.push_async_callback(logged)


async def until_stopped(work: Awaitable[Any], stop: asyncio.Event) -> bool:
    """Awaits `work` unless `stop` comes first; True when the work finished."""
    task = asyncio.ensure_future(work)
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if task.done():
        task.result()
        return True
    task.cancel()
    return False


def open_metrics(
    args: argparse.Namespace, stack: contextlib.AsyncExitStack
) -> tuple[CollectorRegistry, MetricsEndpoint] | None:
    """`--metrics-port`'s registry and endpoint, bound now like every other endpoint (before the
    model loads); None when it is 0. What the process serves is registered on it as it starts."""
    if not args.metrics_port:
        return None
    registry = process_registry()
    endpoint = serve_metrics(registry, args.host, args.metrics_port)
    on_close(stack, lambda: asyncio.to_thread(endpoint.close))
    return registry, endpoint


def endpoints(
    args: argparse.Namespace,
    server: Any,
    sockets: dict[str, socket.socket],
    metrics: MetricsEndpoint | None = None,
) -> dict[str, str]:
    """The public endpoints, by name, as the log, the ready file and `on_ready` give them."""
    found: dict[str, str] = {}
    if server.router_endpoint:
        found["router"] = server.router_endpoint
    public_pub = [e for e in server.pub_endpoints if e.startswith("tcp://")]
    if public_pub:
        found["pub"] = public_pub[0]
    scheme = "wss" if args.tls_cert else "ws"
    if "json" in sockets:
        found["json websocket"] = f"{scheme}://{args.host}:{sockets['json'].getsockname()[1]}"
    if "openpi" in sockets:
        found["openpi websocket"] = f"{scheme}://{args.host}:{sockets['openpi'].getsockname()[1]}"
    if metrics is not None:
        found["metrics"] = f"http://{args.host}:{metrics.port}/metrics"
    return found


def gateway_argv(args: argparse.Namespace, name: str, server: Any, ipc_dir: str) -> list[str]:
    """The command line of the `name` gateway (`runtime.gateway`), after its module name."""
    argv = [
        name,
        "--router", server.internal_endpoint or "",
        "--pub", f"ipc://{ipc_dir}/pub",
        "--max-batch", str(args.max_batch),
        "--max-connections", str(args.max_ws_connections),
        "--max-connections-per-client", str(args.max_ws_connections_per_client),
        "--log-level", args.log_level,
        "--log-format", args.log_format,
    ]  # fmt: skip
    # Paths only: the gateway reads the token itself, so it never shows in a process listing.
    for flag, value in (("--token-file", args.token_file), ("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key)):
        if value:
            argv += [flag, os.path.abspath(value)]
    for origin in args.allow_origin:
        argv += ["--allow-origin", origin]
    if name == "openpi":
        argv += ["--openpi-layout", args.openpi_layout]
        if args.default_prompt:
            argv += ["--default-prompt", args.default_prompt]
    return argv


async def start_gateways(
    args: argparse.Namespace,
    server: Any,
    sockets: dict[str, socket.socket],
    ipc_dir: str,
    stop: asyncio.Event,
    stack: contextlib.AsyncExitStack,
    registry: CollectorRegistry | None = None,
) -> bool:
    """One gateway process per WebSocket socket, each serving before the next starts, their
    connections on `registry` (the process's metrics) if given; False if `stop` came first."""
    gateways: list[GatewayProcess] = []
    if registry is not None:
        registry.register(GatewayCollector(gateways))
    for name, sock in sockets.items():
        gateway = GatewayProcess(name, sock, gateway_argv(args, name, server, ipc_dir))
        on_close(stack, gateway.close)
        if not await until_stopped(gateway.start(), stop):
            return False
        gateways.append(gateway)
    return True


async def run_demo(
    args: argparse.Namespace, found: dict[str, str], stop: asyncio.Event, stack: contextlib.AsyncExitStack
) -> None:
    """Drives the simulated arm through the endpoints `found` (`--demo`), until `stop` or the end
    of `--demo-duration`, which then sets `stop`."""
    from runtime.robot.demo import Demo

    cfg = get_model_config(args.config)
    demo = Demo(found["router"], found["pub"], args.demo_duration, model_info(args)["label"], cfg.siglip.image_size)
    on_close(stack, lambda: asyncio.to_thread(demo.stop))

    async def end_with_demo() -> None:
        await asyncio.to_thread(demo.done.wait)
        if args.demo_duration is not None:
            stop.set()

    task = asyncio.create_task(end_with_demo())
    on_close(stack, lambda: cancel(task))


async def cancel(task: asyncio.Task) -> None:
    """Cancels `task` and waits for it."""
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def fan_out(*callbacks: Callable[..., None] | None) -> Callable[..., None] | None:
    """One callback calling each given one in turn; None when none is given (nothing to call)."""
    given = [c for c in callbacks if c is not None]
    if not given:
        return None
    if len(given) == 1:
        return given[0]

    def each(*args: Any) -> None:
        for callback in given:
            callback(*args)

    return each
