"""`python -m runtime.policy_server`: one process serving Pi0.5 to many robots.

The engine runs the model; the ZMQ ROUTER and XPUB, the JSON WebSocket API and openpi's
WebSocket protocol are its endpoints. A port of 0 disables that endpoint. It logs each endpoint
when bound and `ready` once it serves; SIGINT or SIGTERM shut it down cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable
from typing import Any

import zmq

from configs import DEFAULT_MODEL, model_config_names
from robots.adapters import ADAPTERS, get_adapter
from runtime.service import InferenceBackend, PolicyService
from transport.openpi_server import OpenpiServer
from transport.ws_common import WsSettings
from transport.ws_json_server import JsonApiServer
from transport.zmq_server import ZmqServer, ZmqServerSettings

log = logging.getLogger("runtime.policy_server")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runtime.policy_server", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=DEFAULT_MODEL, help=f"model config: {', '.join(model_config_names())}")
    p.add_argument("--checkpoint", default=None, help="openpi checkpoint dir (default: random weights)")
    p.add_argument("--tokenizer", default=None, help="PaliGemma SentencePiece file (full-size configs)")
    p.add_argument("--norm-stats", default=None, help="openpi norm_stats.json or checkpoint assets/<id>/ folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind every endpoint to")
    p.add_argument("--router-port", type=int, default=5555, help="ZMQ ROUTER for requests (0: off)")
    p.add_argument("--pub-port", type=int, default=5556, help="ZMQ PUB for subtask refreshes (0: off)")
    p.add_argument("--ws-port", type=int, default=8765, help="JSON WebSocket API (0: off)")
    p.add_argument("--openpi-port", type=int, default=8000, help="openpi msgpack WebSocket protocol (0: off)")
    p.add_argument(
        "--openpi-layout", choices=sorted(ADAPTERS), default="droid", help="robot layout of openpi observations"
    )
    p.add_argument("--default-prompt", default=None, help="prompt for openpi observations that carry none")
    p.add_argument("--gpu-id", type=int, default=None, help="index into jax.devices()")
    p.add_argument("--max-batch", type=int, default=8, help="most requests batched into one model call")
    p.add_argument("--batch-window-ms", type=float, default=3.0, help="how long to wait for a batch to fill")
    p.add_argument("--demo", action="store_true", help="also drive the simulated arm through the ZMQ endpoints")
    p.add_argument(
        "--demo-duration", type=float, default=None, help="seconds of demo, then exit (default: until Ctrl-C)"
    )
    p.add_argument("--log-level", default="INFO")
    return p


def make_engine(args: argparse.Namespace) -> Any:
    from policy.engine import AsyncPi05Inference

    return AsyncPi05Inference(
        config_name=args.config,
        gpu_id=args.gpu_id,
        checkpoint_dir=args.checkpoint,
        tokenizer_path=args.tokenizer,
        norm_stats=args.norm_stats,
        max_batch=args.max_batch,
        batch_buckets=(1, 2, 4, 8, 16, 32),  # the engine keeps those up to max_batch, and max_batch
        batch_window_ms=args.batch_window_ms,
    )


def _endpoint(host: str, port: int) -> str:
    return f"tcp://{host}:{port}"


async def serve(
    args: argparse.Namespace,
    backend: InferenceBackend | None = None,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[dict[str, str]], None] | None = None,
) -> None:
    """Runs until `stop` is set (or a signal arrives). `backend` replaces the engine (benchmarks)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
    engine = backend or make_engine(args)
    closers: list[Callable[[], Any]] = []
    endpoints: dict[str, str] = {}
    try:
        if backend is None:
            await engine.start()
            closers.append(engine.close)
        if args.router_port:
            zmq_server = await _start_zmq(args, engine, closers)
            endpoints["router"] = zmq_server.router_endpoint
            if zmq_server.pub_endpoint:
                endpoints["pub"] = zmq_server.pub_endpoint
        if args.ws_port:
            json_server = await _start_json(args, engine, closers)
            endpoints["json websocket"] = f"ws://{args.host}:{json_server.port}"
        if args.openpi_port:
            openpi_server = await _start_openpi(args, engine, closers)
            endpoints["openpi websocket"] = f"ws://{args.host}:{openpi_server.port} (layout {args.openpi_layout})"
        for name, endpoint in endpoints.items():
            log.info("%s endpoint: %s", name, endpoint)
        log.info("ready")
        if on_ready is not None:
            on_ready(endpoints)
        if args.demo:
            if backend is None:
                # Compiles running beside the robot's loop would starve it on a small CPU.
                log.info("the demo starts once every batch bucket is compiled")
                await engine.wait_until_compiled()
            await _run_demo(args, endpoints, stop, closers)
        await stop.wait()
        log.info("shutting down")
    finally:
        for close in reversed(closers):
            await close()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(sig)


async def _run_demo(args: argparse.Namespace, endpoints: dict[str, str], stop: asyncio.Event, closers: list) -> None:
    from runtime.demo import Demo

    if "router" not in endpoints or "pub" not in endpoints:
        raise ValueError("--demo needs the ZMQ endpoints: --router-port and --pub-port must not be 0")
    demo = Demo(endpoints["router"], endpoints["pub"], args.demo_duration)
    closers.append(lambda: asyncio.to_thread(demo.stop))

    async def end_with_demo() -> None:
        await asyncio.to_thread(demo.done.wait)
        if args.demo_duration is not None:
            stop.set()

    closers.append(_cancel_on_close(asyncio.create_task(end_with_demo())))


def _cancel_on_close(task: asyncio.Task):
    async def close() -> None:
        task.cancel()

    return close


async def _start_zmq(args: argparse.Namespace, engine: InferenceBackend, closers: list) -> ZmqServer:
    settings = ZmqServerSettings(
        router_endpoint=_endpoint(args.host, args.router_port),
        pub_endpoint=_endpoint(args.host, args.pub_port) if args.pub_port else None,
    )
    # The handler is looked up when a request comes, by then `service` exists.
    server = ZmqServer(settings, lambda request: service.handle(request.robot, request))
    await server.start()
    service = PolicyService(engine, server.publish)
    closers.append(server.close)
    closers.append(service.close)
    return server


async def _start_json(args: argparse.Namespace, engine: InferenceBackend, closers: list) -> JsonApiServer:
    server = JsonApiServer(
        WsSettings(args.host, args.ws_port),
        lambda key, r: service.handle(key, r),
        lambda key: service.drop_session(key),
    )
    await server.start()
    service = PolicyService(engine, server.push)
    closers.append(server.close)
    closers.append(service.close)
    return server


def openpi_handler(engine: InferenceBackend, layout: str, default_prompt: str | None):
    """openpi observation dict -> robot adapter -> engine (no subtask stage, as openpi) -> actions."""
    adapter = get_adapter(layout)

    async def handle(obs: dict[str, Any]) -> dict[str, Any]:
        inputs = adapter.to_model(obs)
        prompt = inputs.prompt or default_prompt
        if not prompt:
            raise ValueError("the observation has no 'prompt' and the server has no --default-prompt")
        out = await engine.infer(
            images=inputs.images, high_level_prompt=prompt, state=inputs.state, generate_subtask=False
        )
        return {"actions": adapter.from_model(out["actions"]), "policy_timing": {"infer_ms": out["timing"]["total_ms"]}}

    return handle


async def _start_openpi(args: argparse.Namespace, engine: InferenceBackend, closers: list) -> OpenpiServer:
    info = engine.info()
    adapter = get_adapter(args.openpi_layout)
    metadata = {
        "server": "pi05-runtime",
        "config": info.get("config"),
        "layout": adapter.name,
        "action_horizon": info.get("action_horizon"),
        "action_dim": adapter.action_dim,
    }
    handler = openpi_handler(engine, args.openpi_layout, args.default_prompt)
    server = OpenpiServer(WsSettings(args.host, args.openpi_port), handler, metadata)
    await server.start()
    closers.append(server.close)
    return server


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        asyncio.run(serve(args))
    except (ValueError, FileNotFoundError) as e:
        log.error("%s", e)
        return 2
    except OSError as e:  # an address in use, or one this host does not have
        log.error("cannot bind an endpoint on %s: %s", args.host, e)
        return 2
    except zmq.ZMQError as e:
        log.error("cannot bind a ZMQ endpoint on %s: %s", args.host, e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
