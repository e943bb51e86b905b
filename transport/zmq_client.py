"""The robot side of the ZMQ transport: a blocking DEALER client, an asyncio one, and refresh subscribers.

`PolicyClient` is what a robot uses: a plain DEALER on the caller's thread, so a request is a send,
a poll and a receive with no event loop in between. It follows the ZeroMQ guide's Lazy Pirate
pattern: each request has an id and a timeout; when one times out, the socket is closed with
`LINGER 0` (dropping whatever was queued for a dead peer), reopened, and every request still
waiting is sent again, up to `retries` times. Replies are matched by id; a late reply to a request
already answered or abandoned is dropped. A socket monitor tells whether a connection is up: a
request fails with `ServerUnreachable` once no connection has existed for `connect_timeout_s` while
it waited, so a server that is not running is reported in seconds, not after every retry.

Several requests can be in flight (`send` returns a future, `poll` makes progress, `wait` blocks for
one), which is how a control loop pipelines without a thread. Refreshes arrive on SUB sockets that
the same calls poll, so their callbacks run on the caller's thread, inside the client's calls.

`AsyncPolicyClient` offers the same requests to asyncio code and `RefreshListener.run` the
subscription.

Given `keys` (`transport.curve.ClientKeys`), every socket is a CURVE client of the server's key;
the server then knows the robot as `user/robot` (user: this client's public key), and so does
its refresh topic. A connection counts as up once its handshake succeeded, so a server that
refuses the key (or wants one) is reported as unreachable, with the handshake's failure named.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import itertools
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import msgpack
import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from policy.request import ChunkGuidance, Observation, Options
from transport import codec
from transport.curve import ClientKeys, apply_client, session_key
from transport.errors import ProtocolError, RemoteError, RequestTimeout, TransportError
from transport.messages import (
    ACTIONS,
    BYE,
    ERROR,
    INFER,
    KEEP,
    MODEL_ACTIONS,
    PING,
    REFRESH,
    REFRESH_INTERVAL,
    REPLY_TYPE,
    SUBTASK,
    client_guidance,
    guidance_to_wire,
    observation_arrays,
    options_to_wire,
)
from transport.zmq_reader import SocketReader

log = logging.getLogger(__name__)

_HWM = 100
_HANDSHAKE_FAILURES = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "the server refused this client's CURVE key (not on its allow-list)",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "the security handshake failed (a CURVE server needs --curve-key and "
    "--curve-server-key; a plain server needs neither)",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "the security handshake failed (is --curve-server-key the server's key?)",
}


class ServerUnreachable(RequestTimeout):
    """No connection to the server could be made (nothing listens there, or the host is unreachable)."""

    code = "unreachable"


def zmq_endpoint(address: str) -> str:
    """The ZeroMQ endpoint for `host:port` or `tcp://host:port` (other transports, e.g. `ipc://`,
    pass unchanged); raises ValueError saying what is expected."""
    scheme, sep, rest = address.partition("://")
    if sep and scheme != "tcp":
        return address
    host, colon, port = (rest if sep else address).rpartition(":")
    if not colon or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"expected host:port or tcp://host:port with a port in 1..65535, got {address!r}")
    return f"tcp://{host}:{int(port)}"


def _encode_request(
    kind: str,
    request_id: int,
    robot_id: str,
    prompt: str | None,
    options: Options | None,
    observation: Observation | None,
    refresh_interval: Any,
    guidance: ChunkGuidance | None = None,
    return_model_actions: bool = False,
) -> list:
    header: dict[str, Any] = {"type": kind, "id": request_id, "robot": robot_id}
    rtc_options, rtc_arrays = guidance_to_wire(guidance, return_model_actions)
    wire = {**options_to_wire(prompt, options, refresh_interval), **rtc_options}
    if wire:
        header["options"] = wire
    arrays: dict[str, np.ndarray] = {}
    if observation is not None:
        header["ts"] = observation.timestamp
        arrays = observation_arrays(observation)
    return codec.encode(header, {**arrays, **rtc_arrays})


def _reply_data(kind: str, header: dict[str, Any]) -> dict[str, Any]:
    """The `data` of a reply to a `kind` request; raises the error it carries."""
    if header.get("type") == ERROR:
        error = header.get("error")
        error = error if isinstance(error, dict) else {}
        raise RemoteError(str(error.get("message", "unknown error")), str(error.get("code", "internal")))
    if header.get("type") != REPLY_TYPE[kind]:
        raise ProtocolError(f"expected a {REPLY_TYPE[kind]!r} reply, got {header.get('type')!r}")
    data = header.get("data")
    return dict(data) if isinstance(data, dict) else {}


def _queue_full(endpoint: str) -> TransportError:
    return TransportError(f"{_HWM} requests to {endpoint} are queued unanswered; not sending more", "busy")


def _split_options(options: dict[str, Any]) -> tuple[Options, Any]:
    """Decoding options and the refresh interval (absent: `KEEP`) from keyword arguments."""
    interval = options.pop(REFRESH_INTERVAL, KEEP)
    return Options(**options), interval


@dataclasses.dataclass(eq=False)
class _Pending:
    future: concurrent.futures.Future
    kind: str
    frames: list
    timeout_s: float
    tries_left: int
    created: float
    sent: float


class PolicyClient:
    """Requests to the policy server's ROUTER from one robot, on the caller's thread (not thread-safe).

    `timeout_s` and `retries` are the defaults of every request; `send`, `start_infer`, `set_refresh`
    and `bye` take their own.
    """

    def __init__(
        self,
        endpoint: str,
        robot_id: str,
        *,
        timeout_s: float = 10.0,
        retries: int = 3,
        connect_timeout_s: float = 3.0,
        context: zmq.Context | None = None,
        keys: ClientKeys | None = None,
    ):
        self.endpoint = zmq_endpoint(endpoint)
        self.robot_id = robot_id
        self.timeout_s = timeout_s
        self.retries = retries
        self.connect_timeout_s = connect_timeout_s
        self.keys = keys
        self.handshake_failure: str | None = None  # why the last security handshake failed
        self.reconnects = 0
        self._ctx = context or zmq.Context.instance()
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._listeners: list[tuple[zmq.Socket, RefreshListener]] = []
        # inproc endpoints report no connection events: they count as connected.
        self._monitored = not self.endpoint.startswith("inproc://")
        self._connected = not self._monitored
        self._down_since = time.monotonic()
        self._socket, self._monitor, self._poller = self._open()

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _open(self) -> tuple[zmq.Socket, zmq.Socket | None, zmq.Poller]:
        socket = self._ctx.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SNDHWM, _HWM)
        socket.setsockopt(zmq.RCVHWM, _HWM)
        if self.keys is not None:
            apply_client(socket, self.keys)
        events = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
        for event in _HANDSHAKE_FAILURES:
            events |= event
        monitor = socket.get_monitor_socket(events) if self._monitored else None
        socket.connect(self.endpoint)
        poller = zmq.Poller()
        poller.register(socket, zmq.POLLIN)
        if monitor is not None:
            poller.register(monitor, zmq.POLLIN)
        for sub, _ in self._listeners:
            poller.register(sub, zmq.POLLIN)
        return socket, monitor, poller

    def _close_socket(self) -> None:
        if self._monitor is not None:
            self._socket.disable_monitor()
            self._monitor.close(linger=0)
        self._socket.close(linger=0)

    def close(self) -> None:
        """Closes the sockets; requests still in flight are cancelled. Closing again does nothing."""
        if self._socket.closed:
            return
        for pending in self._pending.values():
            pending.future.cancel()
        self._pending.clear()
        self._close_socket()
        for sub, _ in self._listeners:
            sub.close(linger=0)
        self._listeners.clear()

    @property
    def connected(self) -> bool:
        """Whether a connection to the server is up (as the socket monitor last said)."""
        return self._connected

    # ------------------------------------------------------------------ requests

    def send(
        self,
        kind: str,
        prompt: str | None = None,
        options: Options | None = None,
        observation: Observation | None = None,
        refresh_interval: Any = KEEP,
        *,
        timeout_s: float | None = None,
        retries: int | None = None,
        guidance: ChunkGuidance | None = None,
        return_model_actions: bool = False,
    ) -> concurrent.futures.Future:
        """Sends a request without waiting. The future (resolved by `poll` or `wait`) gives the reply's
        `data` (with `actions` for an infer, and `model_actions` when asked) or raises its error;
        cancel it to abandon the request."""
        request_id = next(self._ids)
        frames = _encode_request(
            kind, request_id, self.robot_id, prompt, options, observation, refresh_interval, guidance,
            return_model_actions,
        )  # fmt: skip
        now = time.monotonic()
        pending = _Pending(
            concurrent.futures.Future(),
            kind,
            frames,
            self.timeout_s if timeout_s is None else timeout_s,
            self.retries if retries is None else retries,
            now,
            now,
        )
        try:
            self._socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            pending.future.set_exception(self._not_sendable())
            return pending.future
        self._pending[request_id] = pending
        return pending.future

    def _not_sendable(self) -> TransportError:
        """Why a send found no room: a refused handshake leaves the socket no peer to queue for."""
        if self._monitor is not None:
            self._read_monitor()
        if self.handshake_failure is not None:
            return ServerUnreachable(f"cannot reach the policy server at {self.endpoint}: {self.handshake_failure}")
        return _queue_full(self.endpoint)

    def wait(self, future: concurrent.futures.Future) -> dict[str, Any]:
        """Blocks until `future` (from `send`) is resolved; its result."""
        while not future.done():
            self.poll(self._next_deadline() - time.monotonic())
        return future.result()

    def poll(self, timeout_s: float = 0.0) -> None:
        """Waits up to `timeout_s` for replies and refreshes, handles what came (resolving futures,
        calling refresh callbacks), then fails or resends the requests whose time is up."""
        timeout_ms = max(0, math.ceil(timeout_s * 1e3))
        events = dict(self._poller.poll(timeout_ms))
        if self._monitor is not None and self._monitor in events:
            self._read_monitor()
        if self._socket in events:
            self._read_replies()
        for sub, listener in self._listeners:
            if sub in events:
                _drain_refreshes(sub, listener)
        self._expire()

    def _next_deadline(self) -> float:
        deadlines = [p.sent + p.timeout_s for p in self._pending.values()]
        if not self._connected:
            deadlines += [max(self._down_since, p.created) + self.connect_timeout_s for p in self._pending.values()]
        return min(deadlines, default=time.monotonic())

    def _read_monitor(self) -> None:
        assert self._monitor is not None
        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)["event"]
            if event in _HANDSHAKE_FAILURES:
                if self.handshake_failure != _HANDSHAKE_FAILURES[event]:
                    log.warning("%s: %s", self.endpoint, _HANDSHAKE_FAILURES[event])
                self.handshake_failure = _HANDSHAKE_FAILURES[event]
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._connected = True
                self.handshake_failure = None
            elif event == zmq.EVENT_DISCONNECTED and self._connected:
                self._connected = False
                self._down_since = time.monotonic()

    def _read_replies(self) -> None:
        while True:
            try:
                frames = self._socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                header, arrays = codec.decode(frames)
            except ProtocolError as e:
                log.warning("dropped an undecodable reply from %s: %s", self.endpoint, e)
                continue
            request_id = header.get("id")
            pending = self._pending.pop(request_id, None) if isinstance(request_id, int) else None
            if pending is None or pending.future.done():
                continue  # a late reply to a request answered or abandoned already
            try:
                data = _reply_data(pending.kind, header)
            except TransportError as e:
                pending.future.set_exception(e)
                continue
            if pending.kind == INFER:
                data[ACTIONS] = arrays.get(ACTIONS)
                if MODEL_ACTIONS in arrays:
                    data[MODEL_ACTIONS] = arrays[MODEL_ACTIONS]
            pending.future.set_result(data)

    def _expire(self) -> None:
        now = time.monotonic()
        reset = False
        for request_id, p in list(self._pending.items()):
            if p.future.done():  # cancelled by its owner
                del self._pending[request_id]
            elif not self._connected and now - max(self._down_since, p.created) >= self.connect_timeout_s:
                del self._pending[request_id]
                p.future.set_exception(
                    ServerUnreachable(
                        f"cannot reach the policy server at {self.endpoint}: no connection for "
                        f"{self.connect_timeout_s:g} s ("
                        f"{self.handshake_failure or 'is it running, and is the address right?'})"
                    )
                )
                reset = True
            elif now >= p.sent + p.timeout_s:
                if p.tries_left == 0:
                    del self._pending[request_id]
                    p.future.set_exception(
                        RequestTimeout(f"no reply to a {p.kind} request from {self.endpoint} within {p.timeout_s:g} s")
                    )
                else:
                    p.tries_left -= 1
                    log.info(
                        "no reply to %s %d in %.1f s; reconnecting to %s",
                        p.kind,
                        request_id,
                        p.timeout_s,
                        self.endpoint,
                    )
                reset = True
        if reset:
            self._reset()

    def _reset(self) -> None:
        """Lazy Pirate: a new socket (the old one's queue and late replies are gone), every request
        still waiting sent again."""
        self._close_socket()
        if self._connected:
            self._connected = not self._monitored
            self._down_since = time.monotonic()
        self._socket, self._monitor, self._poller = self._open()
        self.reconnects += 1
        now = time.monotonic()
        for request_id, p in list(self._pending.items()):
            p.sent = now
            try:
                self._socket.send_multipart(p.frames, flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                del self._pending[request_id]
                p.future.set_exception(_queue_full(self.endpoint))

    def request(
        self,
        kind: str,
        prompt: str | None = None,
        options: Options | None = None,
        observation: Observation | None = None,
        refresh_interval: Any = KEEP,
        *,
        timeout_s: float | None = None,
        retries: int | None = None,
    ) -> dict[str, Any]:
        """Sends one request and waits for its reply's `data`."""
        future = self.send(kind, prompt, options, observation, refresh_interval, timeout_s=timeout_s, retries=retries)
        return self.wait(future)

    def start_infer(
        self,
        images: Mapping[str, np.ndarray],
        high_level_prompt: str,
        state: np.ndarray | None = None,
        timestamp: float | None = None,
        *,
        timeout_s: float | None = None,
        retries: int | None = None,
        prev_actions: np.ndarray | None = None,
        inference_delay: int | None = None,
        execute_horizon: int | None = None,
        rtc_schedule: str | None = None,
        max_guidance_weight: float | None = None,
        return_model_actions: bool = False,
        **options: Any,
    ) -> concurrent.futures.Future:
        """`infer` without waiting: a future of its result. Real-time chunking: `prev_actions` (the
        unexecuted leftover from this observation's step on, robot units) with `inference_delay`
        and `execute_horizon` (steps) continues the chunk being executed (docs/protocol.md)."""
        opts, interval = _split_options(options)
        obs = Observation(images, state, timestamp)
        guidance = client_guidance(prev_actions, inference_delay, execute_horizon, rtc_schedule, max_guidance_weight)
        return self.send(
            INFER, high_level_prompt, opts, obs, interval, timeout_s=timeout_s, retries=retries, guidance=guidance,
            return_model_actions=return_model_actions,
        )  # fmt: skip

    def infer(
        self,
        images: Mapping[str, np.ndarray],
        high_level_prompt: str,
        state: np.ndarray | None = None,
        timestamp: float | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """An action chunk: the reply's fields (`subtask`, `timing`, ...) plus `actions` (an array);
        takes `start_infer`'s real-time chunking arguments."""
        return self.wait(self.start_infer(images, high_level_prompt, state, timestamp, **options))

    def subtask(
        self, images: Mapping[str, np.ndarray], high_level_prompt: str, state: np.ndarray | None = None, **options: Any
    ) -> dict[str, Any]:
        opts, interval = _split_options(options)
        return self.request(SUBTASK, high_level_prompt, opts, Observation(images, state), interval)

    def set_refresh(
        self,
        interval_s: float | None,
        images: Mapping[str, np.ndarray] | None = None,
        high_level_prompt: str | None = None,
        state: np.ndarray | None = None,
        *,
        timeout_s: float | None = None,
        retries: int | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """Sets (seconds), changes or clears (None) this robot's subtask refresh interval; see
        `AsyncPolicyClient.set_refresh`."""
        obs = Observation(images, state) if images else None
        opts = Options(**options) if high_level_prompt is not None else None
        return self.request(REFRESH, high_level_prompt, opts, obs, interval_s, timeout_s=timeout_s, retries=retries)

    def last_refresh(self) -> dict[str, Any] | None:
        return self.request(REFRESH).get("last")

    def ping(self, *, timeout_s: float | None = None, retries: int | None = None) -> dict[str, Any]:
        return self.request(PING, timeout_s=timeout_s, retries=retries)

    def bye(self, *, timeout_s: float | None = None, retries: int | None = None) -> dict[str, Any]:
        """Ends this robot's session on the server (its refresh included)."""
        return self.request(BYE, timeout_s=timeout_s, retries=retries)

    def listen_refreshes(self, pub_endpoint: str, callback: Callable[[dict[str, Any]], None]) -> RefreshListener:
        """Subscribes to this robot's refreshes. `callback(message)` runs inside this client's calls
        (`poll`, `wait` and the blocking requests): a caller that only waits for refreshes calls `poll`."""
        listener = RefreshListener(pub_endpoint, self.robot_id, callback, self._ctx, self.keys)
        sub = listener.subscriber()
        self._listeners.append((sub, listener))
        self._poller.register(sub, zmq.POLLIN)
        return listener


def _drain_refreshes(sub: zmq.Socket, listener: RefreshListener) -> None:
    while True:
        try:
            frames = sub.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        listener.deliver(frames)


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
        socket.setsockopt(zmq.SNDHWM, _HWM)
        socket.setsockopt(zmq.RCVHWM, _HWM)
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
        frames = _encode_request(
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
        return _reply_data(kind, header), arrays

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
        opts, interval = _split_options(options)
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
        opts, interval = _split_options(options)
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


class RefreshListener:
    """One robot's subtask refreshes: `callback(message)` for each new one.

    Messages are matched on the exact topic (ZMQ matches prefixes) and a message whose `seq` is not
    newer than the last one seen from the same server `epoch` is dropped, so a replayed last value is
    delivered once and a restarted server (a new epoch) is followed. `run` subscribes on an asyncio
    loop; `PolicyClient.listen_refreshes` feeds `deliver` from its own polling instead. With `keys`
    the topic is `user/robot`: under CURVE the server lets a subscriber have its own topics only.
    """

    def __init__(
        self,
        endpoint: str,
        robot_id: str,
        callback: Callable[[dict[str, Any]], None],
        context: zmq.Context | None = None,
        keys: ClientKeys | None = None,
    ):
        self.endpoint = zmq_endpoint(endpoint)
        self.topic = session_key(keys.user if keys else None, robot_id).encode()
        self.keys = keys
        self._callback = callback
        self._ctx = context or zmq.Context.instance()
        self.last_seq = -1
        self.epoch: Any = None
        self.received = 0

    def deliver(self, frames: list[bytes]) -> None:
        """Calls the callback with the message in `frames` if it is this robot's and new."""
        if len(frames) != 2 or frames[0] != self.topic:
            return
        try:
            message = msgpack.unpackb(frames[1], raw=False)
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
            log.warning("dropped an undecodable refresh: %s", e)
            return
        if not isinstance(message, dict):
            return
        seq, epoch = message.get("seq"), message.get("epoch")
        if not isinstance(seq, int):
            return
        if epoch == self.epoch and seq <= self.last_seq:
            return
        self.epoch, self.last_seq = epoch, seq
        self.received += 1
        self._callback(message)

    def subscriber(self) -> zmq.Socket:
        """A SUB socket subscribed to this robot's topic, connected."""
        socket = self._ctx.socket(zmq.SUB)
        socket.setsockopt(zmq.LINGER, 0)
        if self.keys is not None:
            apply_client(socket, self.keys)
        socket.setsockopt(zmq.SUBSCRIBE, self.topic)
        socket.connect(self.endpoint)
        return socket

    async def run(self) -> None:
        """Subscribes and delivers until cancelled."""
        socket = self.subscriber()
        reader = SocketReader(
            asyncio.get_running_loop(), socket, lambda frames: self.deliver([f.bytes for f in frames])
        )
        try:
            await asyncio.Event().wait()
        finally:
            reader.close()
            socket.close(linger=0)
