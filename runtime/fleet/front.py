"""The policy server's fleet modes: the front host (`--workers N`, `--gpu-ids 0,1`, `--ray ADDRESS`)
and a worker's start (`--join tcp://BROKER:PORT`).

The front host binds what robots reach (the broker's ROUTER and XPUB, and the WebSocket ports,
whose gateway processes stay on the front host and talk to the broker's internal endpoints as they
would to a single server's), starts the broker on a thread and one worker process per device, and
announces `ready` once every worker has joined. Its own workers join over `ipc://`, plain; `--worker-port`
also opens the broker's back end on TCP for workers on other hosts (`--join tcp://FRONT:PORT`), with
CURVE and an allow-list of worker keys under `--worker-curve-secret/--worker-curve-clients` (such a
worker gives `--join-curve-server-key/--join-curve-key`; docs/security.md). With `--ray` the workers
are Ray replicas instead (`runtime.fleet.ray_front`), joining the TCP side with keys this host makes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable

from runtime import child_process
from runtime.cli_args import loopback, tcp_endpoint
from runtime.fleet.broker import Broker, BrokerSettings
from runtime.fleet.broker_main import worker_side_keys
from runtime.fleet.heartbeat import DEFAULT_MISSES
from runtime.fleet.metrics import BrokerCollector
from runtime.fleet.worker_link import WorkerLink, tcp_host
from runtime.fleet.workers import WorkerProcess, worker_specs
from runtime.request_metrics import RequestMetrics
from runtime.serving import (
    cancel,
    endpoints,
    fan_out,
    listen_websockets,
    on_close,
    open_metrics,
    run_demo,
    start_gateways,
    until_stopped,
)
from transport import curve
from transport.supervise import supervise
from transport.zmq_server import ZmqServer

log = logging.getLogger(__name__)


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
    worker_argv: list[str],
    ipc_dir: str,
    curve_keys: curve.ServerKeys | None,
    stop: asyncio.Event,
    stack: contextlib.AsyncExitStack,
    announce: Callable[[dict[str, str]], None],
) -> None:
    """The front host, inside `runtime.policy_server`'s `serve` (which owns the signals, `ipc_dir`
    and `stack`). Its workers get `--join` and `worker_argv`, the parsed values of the flags that
    apply to workers; `announce` is called once every worker joined and the gateways serve."""
    worker_keys, ray_fleet = None, None
    if args.ray:
        from runtime.fleet import ray_front  # imports ray: only with --ray

        worker_keys, replica_keys = ray_front.replica_keys(args, ipc_dir)
        ray_fleet = ray_front.RayFleet(args, worker_argv, replica_keys)
    elif args.worker_port:
        worker_keys = worker_side_keys(args.worker_curve_secret, args.worker_curve_clients, args.host, curve_keys)
    remote = bool(args.worker_port or args.ray)  # a TCP side for workers of other hosts (a Ray node's)
    metrics = open_metrics(args, stack)
    registry = metrics[0] if metrics else None
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
            remote_backend_endpoint=tcp_endpoint(args.host, args.worker_port) if remote else None,
            remote_xsub_endpoint=tcp_endpoint(args.host, 0) if remote else None,
            heartbeat_s=args.heartbeat,
            heartbeat_misses=DEFAULT_MISSES,
            # A worker answers `timeout` itself after --deadline in its queue; the model's own time
            # comes on top, so the broker waits well beyond that before answering for it.
            request_timeout_s=max(30.0, 3 * args.deadline),
            curve=curve_keys,
            worker_curve=worker_keys,
        ),
        observe=fan_out(RequestMetrics(registry).observe if registry else None, ray_fleet and ray_fleet.observe),
    )
    if registry is not None:
        registry.register(BrokerCollector(broker))
    broker.bind()
    on_close(stack, lambda: asyncio.to_thread(broker.close))
    sockets = listen_websockets(args, stack)
    found = endpoints(args, broker, sockets, metrics[1] if metrics else None)
    log.info("workers join %s", broker.backend_endpoint)
    if broker.remote_backend_endpoint:
        how = "with an allowed CURVE key" if worker_keys else "with no key (plain)"
        log.info("workers of other hosts join %s %s", broker.remote_backend_endpoint, how)
    broker.start()
    if ray_fleet is not None:
        on_close(stack, ray_fleet.close)
        if not await until_stopped(ray_fleet.start(broker), stop):
            return
        log.info("waiting for %d Ray replicas to join", args.replicas)
        if not await until_stopped(ray_fleet.wait_joined(args.replicas), stop):
            return
        scaling = asyncio.create_task(supervise("ray-scaling", ray_fleet.run_scaling))
        on_close(stack, lambda: cancel(scaling))
    else:
        argv = ["--join", broker.backend_endpoint, *worker_argv]
        workers = [WorkerProcess(spec, argv) for spec in worker_specs(args.workers or 0, args.gpu_ids)]
        for worker in workers:
            on_close(stack, worker.close)
            await worker.start()
        log.info("waiting for %d workers to join", len(workers))
        if not await until_stopped(_joined(broker, workers), stop):
            return
    if not await start_gateways(args, broker, sockets, ipc_dir, stop, stack, registry):
        return
    announce(found)
    if args.demo:
        await run_demo(args, found, stop, stack)
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
