"""`AsyncPolicyClient`: requests to the policy server's ROUTER from one robot, for asyncio code (the
server's WebSocket gateways use one per connection; robots use the blocking `PolicyClient`)."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import zmq

from policy.request import ChunkGuidance, Observation, Options
from transport import codec
from transport.curve import ClientKeys, apply_client
from transport.errors import ProtocolError, RequestTimeout
from transport.messages import (
    ACTIONS,
    BYE,
    INFER,
    KEEP,
    MODEL_ACTIONS,
    PING,
    REFRESH,
    SUBTASK,
    client_guidance,
)
from transport.zmq_reader import SocketReader
from transport.zmq_requests import QUEUE_LIMIT, encode_request, reply_data, split_options, zmq_endpoint

log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class _AsyncPending:
    frames: list
    future: asyncio.Future


class AsyncPolicyClient:
    """Requests to the policy server's ROUTER from one robot, for asyncio code.

    Lazy Pirate as in `PolicyClient`: on a timeout the socket is replaced and every request still
    waiting is sent again, up to `retries` times. The socket is a plain one read by a
    `SocketReader` on the running loop (pyzmq's asyncio sockets add about a millisecond per round
    trip); the server's WebSocket gateways use one client per connection.
    """

    def __init__(
        self,
        endpoint: str,
        robot_id: str,
        *,
        timeout_s: float = 10.0,
        retries: int = 3,
        context: zmq.Context | None = None,
        keys: ClientKeys | None = None,
    ):
        self.endpoint = zmq_endpoint(endpoint)
        self.robot_id = robot_id
        self.timeout_s = timeout_s
        self.retries = retries
        self.keys = keys
        self._ctx = context or zmq.Context.instance()
        self._socket: zmq.Socket | None = None
        self._reader: SocketReader | None = None
        self._pending: dict[int, _AsyncPending] = {}
        self._ids = itertools.count(1)
        self.reconnects = 0

    async def __aenter__(self) -> AsyncPolicyClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def connect(self) -> None:
        socket = self._ctx.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SNDHWM, QUEUE_LIMIT)
        socket.setsockopt(zmq.RCVHWM, QUEUE_LIMIT)
        if self.keys is not None:
            apply_client(socket, self.keys)
        socket.connect(self.endpoint)
        self._socket = socket
        self._reader = SocketReader(asyncio.get_running_loop(), socket, self._on_reply)

    async def close(self) -> None:
        self._close_socket()
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.cancel()
        self._pending.clear()

    async def _reconnect(self) -> None:
        self._close_socket()
        await self.connect()
        self.reconnects += 1
        for pending in list(self._pending.values()):
            await self._send(pending.frames)

    def _close_socket(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    async def _send(self, frames: list) -> None:
        """Sends without blocking the loop; waits (briefly, repeatedly) while ZMQ has no room or
        no connection yet, until the request's timeout."""
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        while True:
            assert self._socket is not None and self._reader is not None
            try:
                self._socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                self._reader.kick()
                return
            except zmq.Again:
                if asyncio.get_running_loop().time() > deadline:
                    raise RequestTimeout(f"could not send to {self.endpoint} in {self.timeout_s} s") from None
                await asyncio.sleep(0.005)

    def _on_reply(self, frames: list) -> None:
        try:
            header, arrays = codec.decode(frames)
        except ProtocolError as e:
            log.warning("dropped an undecodable reply: %s", e)
            return
        request_id = header.get("id")
        pending = self._pending.get(request_id) if isinstance(request_id, int) else None
        if pending is None or pending.future.done():
            return  # a late reply to a request answered or abandoned already
        pending.future.set_result((header, arrays))

    async def request(
        self,
        kind: str,
        prompt: str | None = None,
        options: Options | None = None,
        observation: Observation | None = None,
        refresh_interval: Any = KEEP,
        guidance: ChunkGuidance | None = None,
        return_model_actions: bool = False,
    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Sends one request and waits for its reply: (reply `data`, reply arrays)."""
        if self._socket is None:
            await self.connect()
        request_id = next(self._ids)
        frames = encode_request(
            kind, request_id, self.robot_id, prompt, options, observation, refresh_interval, guidance,
            return_model_actions,
        )  # fmt: skip
        future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = _AsyncPending(frames, future)
        try:
            await self._send(frames)
            for attempt in range(self.retries + 1):
                # `asyncio.wait` on the future itself: no task wrapped around it (`wait_for` and
                # `shield` cost a few loop turns per request).
                done, _ = await asyncio.wait((future,), timeout=self.timeout_s)
                if done:
                    header, arrays = future.result()
                    break
                if attempt == self.retries:
                    raise RequestTimeout(
                        f"no reply to {kind} request {request_id} from {self.endpoint} after "
                        f"{self.retries + 1} tries of {self.timeout_s} s"
                    )
                log.info(
                    "no reply to %s %d in %.1f s; reconnecting to %s", kind, request_id, self.timeout_s, self.endpoint
                )
                await self._reconnect()
        finally:
            self._pending.pop(request_id, None)
        return reply_data(kind, header), arrays

    async def infer(
        self,
        images: Mapping[str, np.ndarray],
        high_level_prompt: str,
        state: np.ndarray | None = None,
        timestamp: float | None = None,
        *,
        prev_actions: np.ndarray | None = None,
        inference_delay: int | None = None,
        execute_horizon: int | None = None,
        rtc_schedule: str | None = None,
        max_guidance_weight: float | None = None,
        return_model_actions: bool = False,
        **options: Any,
    ) -> dict[str, Any]:
        """An action chunk: the reply's fields (`subtask`, `timing`, ...) plus `actions` (an array),
        and `model_actions` when asked; real-time chunking as `PolicyClient.start_infer`."""
        opts, interval = split_options(options)
        guidance = client_guidance(prev_actions, inference_delay, execute_horizon, rtc_schedule, max_guidance_weight)
        data, arrays = await self.request(
            INFER, high_level_prompt, opts, Observation(images, state, timestamp), interval, guidance,
            return_model_actions,
        )  # fmt: skip
        out = {**data, ACTIONS: arrays.get(ACTIONS)}
        if MODEL_ACTIONS in arrays:
            out[MODEL_ACTIONS] = arrays[MODEL_ACTIONS]
        return out

    async def subtask(
        self, images: Mapping[str, np.ndarray], high_level_prompt: str, state: np.ndarray | None = None, **options: Any
    ) -> dict[str, Any]:
        opts, interval = split_options(options)
        data, _ = await self.request(SUBTASK, high_level_prompt, opts, Observation(images, state), interval)
        return data

    async def set_refresh(
        self,
        interval_s: float | None,
        images: Mapping[str, np.ndarray] | None = None,
        high_level_prompt: str | None = None,
        state: np.ndarray | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """Sets (seconds), changes or clears (None) this robot's subtask refresh interval.

        The server refreshes from this robot's latest observation and prompt; an observation or
        prompt (with decoding `options`) given here becomes the latest. The reply includes the last
        refresh published, if any.
        """
        obs = Observation(images, state) if images else None
        opts = Options(**options) if high_level_prompt is not None else None
        data, _ = await self.request(REFRESH, high_level_prompt, opts, obs, interval_s)
        return data

    async def last_refresh(self) -> dict[str, Any] | None:
        data, _ = await self.request(REFRESH)
        return data.get("last")

    async def ping(self) -> dict[str, Any]:
        data, _ = await self.request(PING)
        return data

    async def bye(self) -> dict[str, Any]:
        """Ends this robot's session on the server (its refresh included)."""
        data, _ = await self.request(BYE)
        return data
