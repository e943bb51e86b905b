"""The policy server's fleet modes: its flags, the front host (`--workers N`, `--gpu-ids 0,1`) and a
worker's start (`--join tcp://BROKER:PORT`).

The front host binds what robots reach (the broker's ROUTER and XPUB, and the WebSocket ports,
whose gateway processes stay on the front host and talk to the broker's internal endpoints as they
would to a single server's), starts the broker on a thread and one worker process per device, and
logs `ready` once every worker has joined. Its own workers join over `ipc://`, plain; `--worker-port`
also opens the broker's back end on TCP for workers on other hosts (`--join tcp://FRONT:PORT`), with
CURVE and an allow-list of worker keys under `--worker-curve-secret/--worker-curve-clients` (such a
worker gives `--join-curve-server-key/--join-curve-key`; docs/security.md).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from runtime import child_process
from runtime.cli_args import loopback, port, positive, tcp_endpoint
from runtime.fleet.broker import Broker, BrokerSettings
from runtime.fleet.broker_main import worker_side_keys
from runtime.fleet.heartbeat import DEFAULT_INTERVAL_S, DEFAULT_MISSES
from runtime.fleet.worker_link import WorkerLink, tcp_host
from runtime.fleet.workers import WorkerProcess, worker_argv, worker_specs
from runtime.gateway.supervisor import GatewayProcess
from runtime.serving import endpoints, gateway_argv, listen, run_demo, until_stopped
from transport import curve
from transport.zmq_server import ZmqServer

log = logging.getLogger("runtime.policy_server.main")

# Flags of the front host that its workers must not get (the rest, model and serving flags, they do).
FRONT_ONLY = frozenset({
    "--workers", "--gpu-ids", "--gpu-id", "--host", "--router-port", "--pub-port", "--ws-port", "--openpi-port",
    "--openpi-layout", "--default-prompt", "--max-ws-connections", "--max-ws-connections-per-client", "--demo",
    "--demo-duration", "--worker-port",
    "--heartbeat", "--curve-secret", "--curve-clients", "--token-file", "--tls-cert", "--tls-key", "--allow-origin",
    "--worker-curve-secret", "--worker-curve-clients",
})  # fmt: skip


def gpu_ids(text: str) -> tuple[int, ...]:
    try:
        ids = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of GPU indices") from None
    if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
        raise argparse.ArgumentTypeError(f"{text!r}: GPU indices must be distinct and >= 0")
    return ids


def cpu_list(text: str) -> frozenset[int]:
    try:
        cpus = frozenset(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of CPU cores") from None
    if not cpus <= os.sched_getaffinity(0):
        raise argparse.ArgumentTypeError(f"{text!r}: this process may run on cores {sorted(os.sched_getaffinity(0))}")
    return cpus


def add_fleet_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fleet (many workers behind one endpoint)")
    g.add_argument("--workers", type=positive(int), default=None, help="front host: broker + N CPU worker processes")
    g.add_argument("--gpu-ids", type=gpu_ids, default=(), help="front host: broker + one worker per GPU, e.g. 0,1,2,3")
    g.add_argument("--worker-port", type=port, default=0, help="front host: TCP port workers of other hosts join")
    g.add_argument(
        "--worker-curve-secret", default=None, metavar="FILE", help="front host: CURVE .key_secret of --worker-port"
    )
    g.add_argument(
        "--worker-curve-clients", default=None, metavar="DIR", help="with --worker-curve-secret: worker keys let in"
    )
    g.add_argument("--heartbeat", type=positive(float), default=DEFAULT_INTERVAL_S, help="fleet heartbeat interval, s")
    g.add_argument("--join", default=None, metavar="ENDPOINT", help="run as a worker of the broker at ENDPOINT")
    g.add_argument(
        "--join-curve-server-key", default=None, metavar="FILE", help="with --join: the broker's public worker-side key"
    )
    g.add_argument("--join-curve-key", default=None, metavar="FILE", help="with --join: this worker's .key_secret")
    g.add_argument("--worker-name", default=None, help="this worker's name in the broker's ping (default host-pid)")
    g.add_argument("--capacity", type=positive(int), default=1, help="this worker's share of robots, relative")
    g.add_argument("--cpus", type=cpu_list, default=None, help="pin this worker to these CPU cores, e.g. 0 or 0,1")
    g.add_argument("--die-with-parent", action="store_true", help=argparse.SUPPRESS)


def check_fleet_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> None:
    front = bool(args.workers or args.gpu_ids)
    if args.workers and args.gpu_ids:
        parser.error("--workers (CPU workers) and --gpu-ids (GPU workers) exclude each other")
    if front and args.join:
        parser.error("--join makes this process a worker; --workers and --gpu-ids make it a front host")
    if args.join and args.demo:
        parser.error("--demo needs the robot endpoints of a front host, not a worker's --join")
    if bool(args.worker_curve_secret) != bool(args.worker_curve_clients):
        parser.error("--worker-curve-secret and --worker-curve-clients go together")
    if args.worker_curve_secret and not (front and args.worker_port):
        parser.error("--worker-curve-secret protects a front host's --worker-port (its own workers join over ipc://)")
    if bool(args.join_curve_server_key) != bool(args.join_curve_key):
        parser.error("--join-curve-server-key and --join-curve-key go together")
    if args.join_curve_key and not args.join:
        parser.error("--join-curve-server-key and --join-curve-key are a worker's: they go with --join")
    if args.join:
        from transport.zmq_requests import zmq_endpoint

        try:
            args.join = zmq_endpoint(args.join)
        except ValueError as e:
            parser.error(f"--join: {e}")
        args.router_port = args.pub_port = args.ws_port = args.openpi_port = 0  # a worker binds none of them
    args.worker_argv = worker_argv(parser, argv, FRONT_ONLY) if front else []


def is_front(args: argparse.Namespace) -> bool:
    return bool(args.workers or args.gpu_ids)


# ---------------------------------------------------------------------- a worker


def join_link(args: argparse.Namespace, server: ZmqServer) -> WorkerLink:
    """This process as a worker (`--join`): pinned to its cores, and its link to the broker (started
    once the service exists). Called before the engine starts, so JAX's threads inherit the pinning."""
    if args.die_with_parent:  # a worker the front host started: it must not outlive it
        child_process.die_with_parent(os.getppid())
    if args.cpus:
        os.sched_setaffinity(0, args.cpus)
    name = args.worker_name or f"{socket.gethostname()}-{os.getpid()}"
    return WorkerLink(args.join, name, server, capacity=args.capacity, keys=join_keys(args))


def join_keys(args: argparse.Namespace) -> curve.ClientKeys | None:
    """A worker's CURVE keys for its link (`--join-curve-server-key/--join-curve-key`), loaded now (a
    bad file is a one-line error); a plain link to a broker beyond loopback is warned about, since
    the robots' requests and this worker's replies would cross the network in clear, to whoever
    answers at that address."""
    keys = curve.load_client_keys(args.join_curve_server_key, args.join_curve_key) if args.join_curve_key else None
    host = tcp_host(args.join)
    if keys is None and host is not None and not loopback(host):
        log.warning(
            "the link to the broker at %s is plain: robots' requests cross the network in clear and anyone "
            "there may pose as the broker; use --join-curve-server-key and --join-curve-key",
            args.join,
        )
    return keys


# ---------------------------------------------------------------------- the front host


async def serve_front(
    args: argparse.Namespace,
    ipc_dir: str,
    curve_keys: Any,
    stop: asyncio.Event,
    closers: list[Callable[[], Awaitable[Any]]],
    sockets: dict[str, socket.socket],
    on_ready: Callable[[dict[str, str]], None] | None,
) -> None:
    """The front host, inside `policy_server.serve` (which owns the signals, `ipc_dir`, and runs
    `closers` at the end)."""
    worker_keys = None
    if args.worker_port:
        worker_keys = worker_side_keys(args.worker_curve_secret, args.worker_curve_clients, args.host, curve_keys)
    broker = Broker(
        BrokerSettings(
            router_endpoint=tcp_endpoint(args.host, args.router_port) if args.router_port else None,
            internal_endpoint=f"ipc://{ipc_dir}/router",
            pub_endpoints=(
                f"ipc://{ipc_dir}/pub",
                *([tcp_endpoint(args.host, args.pub_port)] if args.pub_port else []),
            ),
            backend_endpoint=f"ipc://{ipc_dir}/workers",  # this host's workers: plain, this user only
            xsub_endpoint=f"ipc://{ipc_dir}/worker-pub",
            remote_backend_endpoint=tcp_endpoint(args.host, args.worker_port) if args.worker_port else None,
            remote_xsub_endpoint=tcp_endpoint(args.host, 0) if args.worker_port else None,
            heartbeat_s=args.heartbeat,
            heartbeat_misses=DEFAULT_MISSES,
            # A worker answers `timeout` itself after --deadline in its queue; the model's own time
            # comes on top, so the broker waits well beyond that before answering for it.
            request_timeout_s=max(30.0, 3 * args.deadline),
            curve=curve_keys,
            worker_curve=worker_keys,
        )
    )
    broker.bind()
    closers.append(lambda: asyncio.to_thread(broker.close))
    gateways = {name: p for name, p in (("json", args.ws_port), ("openpi", args.openpi_port)) if p}
    for name, ws_port in gateways.items():
        sockets[name] = listen(args.host, ws_port)
    found = endpoints(args, broker, sockets)
    for name, endpoint in found.items():
        log.info("%s endpoint: %s", name, endpoint)
    log.info("workers join %s", broker.backend_endpoint)
    if broker.remote_backend_endpoint:
        how = "with an allowed CURVE key" if worker_keys else "with no key (plain)"
        log.info("workers of other hosts join %s %s", broker.remote_backend_endpoint, how)
    broker.start()
    argv = ["--join", broker.backend_endpoint, *args.worker_argv]
    workers = [WorkerProcess(spec, argv) for spec in worker_specs(args.workers or 0, args.gpu_ids)]
    for worker in workers:
        closers.append(worker.close)
        await worker.start()
    log.info("waiting for %d workers to join", len(workers))
    if not await until_stopped(_joined(broker, workers), stop):
        return
    for name, sock in sockets.items():
        gateway = GatewayProcess(name, sock, gateway_argv(args, name, broker, ipc_dir))
        closers.append(gateway.close)
        if not await until_stopped(gateway.start(), stop):
            return
    log.info("ready")
    if on_ready is not None:
        on_ready(found)
    if args.demo:
        await run_demo(args, found, stop, closers)
    await stop.wait()
    log.info("shutting down")


async def _joined(broker: Broker, workers: list[WorkerProcess]) -> None:
    """Returns once every worker joined; a worker that exits first is a start-up error (a bad flag,
    a checkpoint it cannot load), reported instead of restarted forever."""
    while len(broker.table.workers) < len(workers):
        failed = [w for w in workers if w.restarts]
        if failed:
            raise RuntimeError(f"policy worker {failed[0].spec.name} exited before it joined (its log is above)")
        await asyncio.sleep(0.05)
