"""The robot side of the ZMQ transport: the blocking DEALER client.

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

`transport.zmq_async_client.AsyncPolicyClient` offers the same requests to asyncio code and
`transport.refresh_listener.RefreshListener.run` the subscription.

Given `keys` (`transport.curve.ClientKeys`), every socket is a CURVE client of the server's key;
the server then knows the robot as `user/robot` (user: this client's public key), and so does
its refresh topic. A connection counts as up once its handshake succeeded, so a server that
refuses the key (or wants one) is reported as unreachable, with the handshake's failure named.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from policy.request import ChunkGuidance, Observation, Options
from transport import codec
from transport.curve import ClientKeys, apply_client
from transport.errors import ProtocolError, RequestTimeout, TransportError
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
from transport.refresh_listener import RefreshListener
from transport.zmq_requests import (
    HANDSHAKE_FAILURES,
    QUEUE_LIMIT,
    ServerUnreachable,
    encode_request,
    queue_full,
    reply_data,
    split_options,
    zmq_endpoint,
)

log = logging.getLogger(__name__)


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
        socket.setsockopt(zmq.SNDHWM, QUEUE_LIMIT)
        socket.setsockopt(zmq.RCVHWM, QUEUE_LIMIT)
        if self.keys is not None:
            apply_client(socket, self.keys)
        events = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
        for event in HANDSHAKE_FAILURES:
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
        frames = encode_request(
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
        return queue_full(self.endpoint)

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
            if event in HANDSHAKE_FAILURES:
                if self.handshake_failure != HANDSHAKE_FAILURES[event]:
                    log.warning("%s: %s", self.endpoint, HANDSHAKE_FAILURES[event])
                self.handshake_failure = HANDSHAKE_FAILURES[event]
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
                data = reply_data(pending.kind, header)
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
                p.future.set_exception(queue_full(self.endpoint))

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
        opts, interval = split_options(options)
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
        opts, interval = split_options(options)
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
