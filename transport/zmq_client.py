"""The robot side of the ZMQ transport: a DEALER client and a SUB listener for refreshes.

The client follows the ZeroMQ guide's Lazy Pirate pattern: each request has an id and a timeout;
on a timeout the socket is closed with `LINGER 0`, reopened, and every request still waiting is
sent again, up to `retries` times, so a client rides through a server restart. Replies are matched
by id; a late reply to a request that is already answered is dropped. `PolicyClient` offers the
same calls blocking, for control loops that are not asyncio.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import threading
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

import msgpack
import numpy as np
import zmq
import zmq.asyncio

from transport import codec
from transport.errors import ProtocolError, RemoteError, RequestTimeout
from transport.messages import (
    ACTIONS,
    ERROR,
    INFER,
    PING,
    REFRESH,
    REPLY_TYPE,
    SUBTASK,
    Observation,
    Options,
    observation_arrays,
    options_to_wire,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclasses.dataclass
class _Pending:
    frames: list
    future: asyncio.Future
    expected: str


class AsyncPolicyClient:
    """Requests to the policy server's ROUTER, from one robot."""

    def __init__(
        self,
        endpoint: str,
        robot_id: str,
        *,
        timeout_s: float = 10.0,
        retries: int = 3,
        context: zmq.asyncio.Context | None = None,
    ):
        self.endpoint = endpoint
        self.robot_id = robot_id
        self.timeout_s = timeout_s
        self.retries = retries
        self._ctx = context or zmq.asyncio.Context.instance()
        self._socket: zmq.asyncio.Socket | None = None
        self._reader: asyncio.Task | None = None
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()
        self.reconnects = 0

    async def __aenter__(self) -> AsyncPolicyClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def connect(self) -> None:
        socket = self._ctx.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SNDHWM, 100)
        socket.setsockopt(zmq.RCVHWM, 100)
        socket.connect(self.endpoint)
        self._socket = socket
        self._reader = asyncio.create_task(self._read(socket), name=f"zmq-client-{self.robot_id}")

    async def close(self) -> None:
        await self._close_socket()
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.cancel()
        self._pending.clear()

    async def _reconnect(self) -> None:
        async with self._lock:
            await self._close_socket()
            await self.connect()
            self.reconnects += 1
            for pending in self._pending.values():
                await self._socket.send_multipart(pending.frames, copy=False)

    async def _close_socket(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    async def _read(self, socket: zmq.asyncio.Socket) -> None:
        while True:
            frames = await socket.recv_multipart(copy=False)
            try:
                header, arrays = codec.decode(frames)
            except ProtocolError as e:
                log.warning("dropped an undecodable reply: %s", e)
                continue
            pending = self._pending.get(header.get("id"))
            if pending is None or pending.future.done():
                continue  # a late reply to a request answered or abandoned already
            pending.future.set_result((header, arrays))

    async def request(
        self, kind: str, options: Options | None = None, observation: Observation | None = None
    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Sends one request and waits for its reply: (reply `data`, reply arrays)."""
        if self._socket is None:
            await self.connect()
        request_id = next(self._ids)
        header: dict[str, Any] = {"type": kind, "id": request_id, "robot": self.robot_id}
        if options is not None:
            header["options"] = options_to_wire(options)
        arrays = None
        if observation is not None:
            header["ts"] = observation.timestamp
            arrays = observation_arrays(observation)
        frames = codec.encode(header, arrays)
        future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = _Pending(frames, future, REPLY_TYPE[kind])
        try:
            async with self._lock:
                await self._socket.send_multipart(frames, copy=False)
            for attempt in range(self.retries + 1):
                try:
                    reply, reply_arrays = await asyncio.wait_for(asyncio.shield(future), self.timeout_s)
                    break
                except TimeoutError:
                    if attempt == self.retries:
                        raise RequestTimeout(
                            f"no reply to {kind} request {request_id} from {self.endpoint} after "
                            f"{self.retries + 1} tries of {self.timeout_s} s"
                        ) from None
                    log.info(
                        "no reply to %s %d in %.1f s; reconnecting to %s",
                        kind,
                        request_id,
                        self.timeout_s,
                        self.endpoint,
                    )
                    await self._reconnect()
        finally:
            self._pending.pop(request_id, None)
        if reply.get("type") == ERROR:
            error = reply.get("error") or {}
            raise RemoteError(error.get("message", "unknown error"), error.get("code", "internal"))
        if reply.get("type") != REPLY_TYPE[kind]:
            raise ProtocolError(f"expected a {REPLY_TYPE[kind]!r} reply, got {reply.get('type')!r}")
        return reply.get("data") or {}, reply_arrays

    async def infer(
        self,
        images: Mapping[str, np.ndarray],
        high_level_prompt: str,
        state: np.ndarray | None = None,
        timestamp: float | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """An action chunk: the reply's fields (`subtask`, `timing`, ...) plus `actions` (an array)."""
        data, arrays = await self.request(
            INFER, Options(high_level_prompt=high_level_prompt, **options), Observation(images, state, timestamp)
        )
        return {**data, ACTIONS: arrays.get(ACTIONS)}

    async def subtask(
        self, images: Mapping[str, np.ndarray], high_level_prompt: str, state: np.ndarray | None = None, **options: Any
    ) -> dict[str, Any]:
        data, _ = await self.request(
            SUBTASK, Options(high_level_prompt=high_level_prompt, **options), Observation(images, state)
        )
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
        opts = Options(high_level_prompt=high_level_prompt, subtask_refresh_interval=interval_s, **options)
        data, _ = await self.request(REFRESH, opts, obs)
        return data

    async def last_refresh(self) -> dict[str, Any] | None:
        data, _ = await self.request(REFRESH, Options())
        return data.get("last")

    async def ping(self) -> dict[str, Any]:
        data, _ = await self.request(PING)
        return data


class _LoopThread:
    """An event loop on a daemon thread, for the blocking API."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        self.loop.close()


class PolicyClient:
    """The blocking face of `AsyncPolicyClient` (its own event loop on a background thread)."""

    def __init__(self, endpoint: str, robot_id: str, *, timeout_s: float = 10.0, retries: int = 3):
        self._thread = _LoopThread(f"zmq-client-{robot_id}")
        self._client = AsyncPolicyClient(endpoint, robot_id, timeout_s=timeout_s, retries=retries)
        self._listeners: list = []
        self._thread.run(self._client.connect())

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for listener in self._listeners:
            listener.cancel()
        self._thread.run(self._client.close())
        self._thread.stop()

    def infer(self, images, high_level_prompt, state=None, timestamp=None, **options) -> dict[str, Any]:
        return self._thread.run(self._client.infer(images, high_level_prompt, state, timestamp, **options))

    def subtask(self, images, high_level_prompt, state=None, **options) -> dict[str, Any]:
        return self._thread.run(self._client.subtask(images, high_level_prompt, state, **options))

    def set_refresh(self, interval_s, images=None, high_level_prompt=None, state=None, **options) -> dict[str, Any]:
        return self._thread.run(self._client.set_refresh(interval_s, images, high_level_prompt, state, **options))

    def ping(self) -> dict[str, Any]:
        return self._thread.run(self._client.ping())

    def listen_refreshes(self, pub_endpoint: str, callback: Callable[[dict[str, Any]], None]) -> RefreshListener:
        """Starts a SUB listener for this robot's refreshes; `callback` runs on the client's thread."""
        listener = RefreshListener(pub_endpoint, self._client.robot_id, callback)
        self._listeners.append(asyncio.run_coroutine_threadsafe(listener.run(), self._thread.loop))
        return listener

    def submit(self, coro_fn: Callable[[AsyncPolicyClient], Coroutine[Any, Any, T]]) -> asyncio.Future:
        """Starts a call without waiting: `client.submit(lambda c: c.infer(...))` -> a future."""
        return asyncio.run_coroutine_threadsafe(coro_fn(self._client), self._thread.loop)


class RefreshListener:
    """Subscribes to one robot's subtask refreshes and calls `callback(message)` for each new one.

    Messages are matched on the exact topic (ZMQ matches prefixes) and a message whose `seq` is not
    newer than the last one seen from the same server `epoch` is dropped, so a replayed last value is
    delivered once and a restarted server (a new epoch) is followed.
    """

    def __init__(
        self,
        endpoint: str,
        robot_id: str,
        callback: Callable[[dict[str, Any]], None],
        context: zmq.asyncio.Context | None = None,
    ):
        self.endpoint = endpoint
        self.topic = robot_id.encode()
        self._callback = callback
        self._ctx = context or zmq.asyncio.Context.instance()
        self.last_seq = -1
        self.epoch: float | None = None
        self.received = 0

    async def run(self) -> None:
        socket = self._ctx.socket(zmq.SUB)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SUBSCRIBE, self.topic)
        socket.connect(self.endpoint)
        try:
            while True:
                frames = await socket.recv_multipart()
                if len(frames) != 2 or frames[0] != self.topic:
                    continue
                try:
                    message = msgpack.unpackb(frames[1], raw=False)
                except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
                    log.warning("dropped an undecodable refresh: %s", e)
                    continue
                if not isinstance(message, dict):
                    continue
                seq, epoch = message.get("seq", -1), message.get("epoch")
                if epoch == self.epoch and seq <= self.last_seq:
                    continue
                self.epoch, self.last_seq = epoch, seq
                self.received += 1
                self._callback(message)
        finally:
            socket.close(linger=0)
