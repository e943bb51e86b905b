"""Round trip of one observation through each transport, with the model switched out.

Three 224x224x3 uint8 images plus an 8-value state go out; a fixed 50x32 float32 action chunk
comes back. Measured in the same run through the ZMQ path (`PolicyClient`), openpi's
msgpack-over-WebSocket protocol (`openpi_client.WebsocketClientPolicy`) and the JSON API
(`JsonApiClient`), all to one server process's real endpoints on 127.0.0.1. The backend answering
every request with the same arrays is this benchmark's switch; it never ships in the server.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import threading
import time
from typing import Any

import numpy as np

from bench.report import percentiles_ms, write_section
from runtime.policy_server import openpi_handler
from runtime.service import PolicyService
from transport.openpi_server import OpenpiServer
from transport.ws_client import JsonApiClient, build_request
from transport.ws_common import WsSettings
from transport.ws_json_server import JsonApiServer
from transport.zmq_client import PolicyClient
from transport.zmq_server import ZmqServer, ZmqServerSettings

CAMERAS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")


class FixedReplyBackend:
    """Answers every request at once with the same arrays: only the transport is timed."""

    def __init__(self, horizon: int = 50, action_dim: int = 32):
        self.actions = np.random.default_rng(0).standard_normal((horizon, action_dim)).astype(np.float32)

    async def infer(self, images, high_level_prompt, state=None, **_: Any) -> dict[str, Any]:
        timing = {"total_ms": 0.0, "subtask_ms": 0.0, "action_ms": 0.0}
        return {"actions": self.actions, "subtask": "", "subtask_tokens": [], "state": state, "timing": timing}

    async def generate_subtask(self, images, high_level_prompt, **_: Any) -> dict[str, Any]:
        return {"subtask": "", "subtask_tokens": [], "timing": {"total_ms": 0.0, "subtask_ms": 0.0}}

    def info(self) -> dict[str, Any]:
        return {"config": "fixed-reply", "action_horizon": 50, "action_dim": 32}


class _Servers:
    """The three endpoints on one event loop in a background thread, like one server process."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self.loop.run_until_complete, args=(self._main(),), daemon=True)
        self._thread.start()
        self._ready.wait(30)

    async def _main(self) -> None:
        backend = FixedReplyBackend()
        self._stop = asyncio.Event()
        holder: list = []

        async def publish(key, message):
            return None

        zmq_service = PolicyService(backend, publish)
        zmq_server = ZmqServer(ZmqServerSettings("tcp://127.0.0.1:*", None), lambda r: zmq_service.handle(r.robot, r))
        json_service = PolicyService(backend, lambda key, message: holder[0].push(key, message))
        json_server = JsonApiServer(WsSettings(port=0), json_service.handle, json_service.drop_session)
        holder.append(json_server)
        openpi = OpenpiServer(WsSettings(port=0), openpi_handler(backend, "droid", None), {})
        for server in (zmq_server, json_server, openpi):
            await server.start()
        self.zmq, self.json_port, self.openpi_port = zmq_server.router_endpoint, json_server.port, openpi.port
        self._ready.set()
        await self._stop.wait()
        for server in (zmq_server, json_server, openpi):
            await server.close()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def _time(fn, iters: int, warmup: int = 5) -> list[float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def run(iters: int) -> str:
    from openpi_client import websocket_client_policy

    rng = np.random.default_rng(0)
    images = {k: rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for k in CAMERAS}
    state = rng.uniform(-1, 1, 8).astype(np.float32)
    servers = _Servers()
    results: dict[str, list[float]] = {}
    try:
        with PolicyClient(servers.zmq, "bench") as zmq_client:
            results["ZMQ frames (DEALER/ROUTER)"] = _time(
                lambda: zmq_client.infer(images, "bench", state, generate_subtask=False), iters
            )
        policy = websocket_client_policy.WebsocketClientPolicy(host="127.0.0.1", port=servers.openpi_port)
        droid = {
            "observation/exterior_image_1_left": images["base_0_rgb"],
            "observation/wrist_image_left": images["left_wrist_0_rgb"],
            "observation/joint_position": state[:7],
            "observation/gripper_position": state[7:],
            "prompt": "bench",
        }
        results["openpi msgpack over WebSocket"] = _time(lambda: policy.infer(droid), iters)
        loop = asyncio.new_event_loop()
        client = JsonApiClient(f"ws://127.0.0.1:{servers.json_port}")
        loop.run_until_complete(client.connect())
        request = build_request(images, "bench", state, generate_subtask=False)
        results["JSON API over WebSocket"] = _time(lambda: loop.run_until_complete(client.request(request)), iters)
        loop.run_until_complete(client.close())
        loop.close()
    finally:
        servers.close()
    base_p50, _ = percentiles_ms(results["ZMQ frames (DEALER/ROUTER)"])
    rows = []
    for name, samples in results.items():
        p50, p99 = percentiles_ms(samples)
        rows.append(f"| {name} | {p50:.2f} | {p99:.2f} | {p50 / base_p50:.1f}x |")
    body = (
        f"Three 224x224x3 uint8 images + 8 state values out, a 50x32 float32 chunk back; model replaced by a "
        f"fixed reply; client and server on one machine over 127.0.0.1; {iters} round trips each.\n\n"
        "| transport | p50 ms | p99 ms | p50 vs ZMQ |\n|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    return write_section(
        "transport_latency",
        "Transport round trip",
        body,
        f"python -m bench.transport_latency --iters {iters}",
        packages=("pyzmq", "websockets", "msgpack", "openpi-client"),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=200)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(run(args.iters))


if __name__ == "__main__":
    main()
