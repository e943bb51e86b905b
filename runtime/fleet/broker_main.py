"""`python -m runtime.broker`: one endpoint for robots in front of many policy workers.

The command around `runtime.fleet.broker.Broker` (what it does, and the protocol, are described
there and in docs/protocol.md, section 6): its flags, the keys of its two sides, loaded before
anything binds, and the warnings about what is left open.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading

import zmq

from runtime.cli_args import (
    CURVE_CLIENTS,
    CURVE_PAIRS,
    CURVE_SECRET,
    LOG_FORMAT,
    LOG_LEVEL,
    METRICS_PORT,
    READY_FILE,
    WORKER_CURVE_CLIENTS,
    WORKER_CURVE_SECRET,
    Option,
    check_together,
    heartbeat_option,
    loopback,
    port,
    positive,
)
from runtime.fleet.broker import Broker, BrokerSettings
from runtime.fleet.heartbeat import DEFAULT_INTERVAL_S, DEFAULT_MISSES
from runtime.fleet.metrics import BrokerCollector
from runtime.metrics_http import process_registry, serve_metrics
from runtime.ready import Readiness
from runtime.request_metrics import RequestMetrics
from transport import curve, logs

log = logging.getLogger(__name__)


OPTIONS = (
    Option(("--host",), {"default": "127.0.0.1", "help": "address the robots' endpoints bind to"}),
    Option(("--router-port",), {"type": port, "default": 5555, "help": "ZMQ ROUTER for robots' requests"}),
    Option(("--pub-port",), {"type": port, "default": 5556, "help": "ZMQ XPUB for subtask refreshes (0: off)"}),
    Option(("--worker-host",), {"default": "127.0.0.1", "help": "address the workers' endpoints bind to"}),
    Option(("--worker-port",), {"type": port, "default": 5557, "help": "ROUTER the workers join (--join)"}),
    Option(("--worker-pub-port",), {"type": port, "default": 5558, "help": "XSUB the workers publish into"}),
    heartbeat_option(DEFAULT_INTERVAL_S),
    Option(
        ("--heartbeat-misses",),
        {"type": positive(int), "default": DEFAULT_MISSES, "help": "intervals of silence: a worker is dead"},
    ),
    Option(("--max-workers",), {"type": positive(int), "default": 64, "help": "workers joined at once"}),
    Option(
        ("--max-workers-per-key",),
        {
            "type": positive(int),
            "default": 16,
            "help": "workers joined with one worker key (without keys: from one address)",
        },
    ),
    Option(
        ("--request-timeout",),
        {
            "type": positive(float),
            "default": 30.0,
            "help": "seconds a worker may hold a request before the broker answers it 'timeout'",
        },
    ),
    Option(("--max-robots",), {"type": positive(int), "default": 4096, "help": "robots whose worker is remembered"}),
    CURVE_SECRET,
    CURVE_CLIENTS,
    WORKER_CURVE_SECRET,
    WORKER_CURVE_CLIENTS,
    METRICS_PORT,
    READY_FILE,
    LOG_LEVEL,
    LOG_FORMAT,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runtime.broker", description=__doc__.splitlines()[0])
    for option in OPTIONS:
        option.add_to(p)
    return p


def worker_side_keys(
    secret: str | None, clients: str | None, host: str, robot_keys: curve.ServerKeys | None
) -> curve.ServerKeys | None:
    """The keys of the workers' side (`--worker-curve-secret/--worker-curve-clients`), loaded now (a
    bad file is a one-line `CurveError` before anything binds). Without them, a TCP worker endpoint is
    warned about, on loopback too: whoever reaches it (any local process, on loopback) can join as a
    worker, be given robots, read their requests and answer them. The two allow-lists must be
    different folders, or every robot could join as a worker."""
    keys = curve.load_server_keys(secret, clients) if secret else None
    if keys is None:
        log.warning(
            "the workers' TCP endpoints on %s take no keys: %s can join as a worker, be sent robots' requests "
            "(their images included) and answer them; use --worker-curve-secret and --worker-curve-clients",
            host,
            "any process on this host" if loopback(host) else "anyone who reaches them",
        )
    if keys is not None and robot_keys is not None and keys.clients_dir.resolve() == robot_keys.clients_dir.resolve():
        raise curve.CurveError(
            f"{keys.clients_dir}: also the robots' allow-list; give the workers a folder of their own"
        )
    if keys is not None:
        log.info("CURVE on the workers' side: %d worker keys allowed from %s", keys.clients, keys.clients_dir)
    return keys


def settings_from(args: argparse.Namespace) -> BrokerSettings:
    robot_keys = curve.load_server_keys(args.curve_secret, args.curve_clients) if args.curve_secret else None
    return BrokerSettings(
        router_endpoint=f"tcp://{args.host}:{args.router_port}" if args.router_port else None,
        pub_endpoints=(f"tcp://{args.host}:{args.pub_port}",) if args.pub_port else (),
        backend_endpoint=f"tcp://{args.worker_host}:{args.worker_port}",
        xsub_endpoint=f"tcp://{args.worker_host}:{args.worker_pub_port}",
        heartbeat_s=args.heartbeat,
        heartbeat_misses=args.heartbeat_misses,
        max_workers=args.max_workers,
        max_workers_per_principal=args.max_workers_per_key,
        request_timeout_s=args.request_timeout,
        max_robots=args.max_robots,
        curve=robot_keys,
        worker_curve=worker_side_keys(
            args.worker_curve_secret, args.worker_curve_clients, args.worker_host, robot_keys
        ),
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_together(parser, args, *CURVE_PAIRS)
    logs.configure(args.log_level, "%(asctime)s %(levelname)s %(name)s: %(message)s", args.log_format, "broker")
    registry = process_registry() if args.metrics_port else None
    try:
        broker = Broker(settings_from(args), observe=RequestMetrics(registry).observe if registry else None)
        broker.bind()
    except curve.CurveError as e:
        log.error("%s", e)
        return 2
    except zmq.ZMQError as e:
        log.error("cannot bind a ZMQ endpoint: %s", e)
        return 2
    try:
        metrics = serve_metrics(registry, args.host, args.metrics_port) if registry else None
    except OSError as e:
        broker.close()
        log.error("cannot bind the metrics endpoint on %s: %s", args.host, e)
        return 2
    if registry is not None:
        registry.register(BrokerCollector(broker))
    if not args.curve_secret and not loopback(args.host):
        log.warning("the robots' endpoints on %s are open to anyone who can reach them: use --curve-secret", args.host)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    log.info("robots: router %s, pub %s", broker.router_endpoint, ", ".join(broker.pub_endpoints) or "off")
    log.info("workers join %s (refreshes into %s)", broker.backend_endpoint, broker.xsub_endpoint)
    endpoints = {"router": broker.router_endpoint, "pub": ", ".join(broker.pub_endpoints)}
    endpoints |= {"workers": broker.backend_endpoint, "worker pub": broker.xsub_endpoint}
    if metrics is not None:
        endpoints["metrics"] = f"http://{args.host}:{metrics.port}/metrics"
    readiness = Readiness(args.ready_file)
    log.info("ready")
    readiness.ready({"role": "broker", "endpoints": {k: v for k, v in endpoints.items() if v}})
    try:
        broker.run(stop)
    finally:
        readiness.stopping()
        broker.close()
        if metrics is not None:
            metrics.close()
    return 0
