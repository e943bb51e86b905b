"""What the single policy server and a fleet's front host both do around their sockets: bind the
WebSocket ports, name the endpoints, start the gateways with their flags, run the demo, and wait for
work unless told to stop.

Both `runtime.policy_server` and `runtime.fleet.front` use it; neither imports the other's internals.
`server` below is the `ZmqServer` of a single server or the `Broker` of a front host: both have a
`router_endpoint`, `pub_endpoints` and an `internal_endpoint` for the gateways.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from configs import SHIPPED_CHECKPOINTS, get_model_config


def model_label(args: argparse.Namespace) -> str:
    """Which model answers, in words, for the log and the demo's status line."""
    if args.fixed_reply:
        return f"{args.config}: fixed reply, no model"
    if args.checkpoint is None:
        return f"{args.config}: random weights"
    if args.config in SHIPPED_CHECKPOINTS and Path(args.checkpoint) == SHIPPED_CHECKPOINTS[args.config]:
        return f"{args.config}: trained demo policy"
    return f"{args.config}: {args.checkpoint}"


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket, bound now; a gateway process inherits it."""
    sock = socket.create_server((host, port), backlog=128)
    sock.set_inheritable(True)
    return sock


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


def endpoints(args: argparse.Namespace, server: Any, sockets: dict[str, socket.socket]) -> dict[str, str]:
    """The public endpoints, by name, as the `ready` log line and `on_ready` give them."""
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
        port_ = sockets["openpi"].getsockname()[1]
        found["openpi websocket"] = f"{scheme}://{args.host}:{port_} (layout {args.openpi_layout})"
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


async def run_demo(args: argparse.Namespace, found: dict[str, str], stop: asyncio.Event, closers: list) -> None:
    """Drives the simulated arm through the endpoints `found` (`--demo`), until `stop` or the end
    of `--demo-duration`, which then sets `stop`."""
    from runtime.robot.demo import Demo

    cfg = get_model_config(args.config)
    demo = Demo(found["router"], found["pub"], args.demo_duration, model_label(args), cfg.siglip.image_size)
    closers.append(lambda: asyncio.to_thread(demo.stop))

    async def end_with_demo() -> None:
        await asyncio.to_thread(demo.done.wait)
        if args.demo_duration is not None:
            stop.set()

    closers.append(cancel_on_close(asyncio.create_task(end_with_demo())))


def cancel_on_close(task: asyncio.Task) -> Callable[[], Awaitable[None]]:
    """A closer that cancels `task` and waits for it."""

    async def close() -> None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    return close
