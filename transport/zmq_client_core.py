"""The one ZMQ client core under the blocking `PolicyClient` and the asyncio `AsyncPolicyClient`.

A client is this core plus a driver. `ClientCore` owns the DEALER (and its monitor), the request
ids, the table of requests waiting, the matching of replies to them and the Lazy Pirate rule of the
ZeroMQ guide; `ClientRequests` turns every request method's arguments into one request. A driver
only says what a future is, and when to look at the sockets (`zmq.Poller` on the caller's thread,
or `SocketReader`s and one timer on an event loop). So both clients have the same methods, return
the same values, and time out, resend, report an unreachable server and match late replies alike.

Lazy Pirate: each request has an id and a timeout; when one times out, the socket is closed with
`LINGER 0` (dropping whatever was queued for a dead peer), reopened, and every request still
waiting is sent again, up to its `retries`. A late reply to a request already answered or abandoned
is dropped. A socket monitor says whether a connection is up: a request fails with
`ServerUnreachable` once no connection has existed for `connect_timeout_s` while it waited, so a
server that is not running is reported in seconds, not after every retry.

Given `keys` (`transport.curve.ClientKeys`), the DEALER is a CURVE client of the server's key; a
connection counts as up once its handshake succeeded, so a server that refuses the key (or wants
one) is reported as unreachable with the handshake's failure named.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import zmq
from zmq.utils.monitor import parse_monitor_message

from policy.request import ChunkGuidance, Observation, Options
from transport import codec
from transport.curve import ClientKeys, apply_client
from transport.errors import ProtocolError, RequestTimeout, TransportError
from transport.messages import BYE, INFER, KEEP, PING, REFRESH, SUBTASK, client_guidance
from transport.zmq_frames import NOBLOCK, readable, recv_frames, send_frames
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

# Frames up to this size are copied into the message rather than lent to libzmq: a lent frame costs
# pyzmq a wake-up of its garbage-collector thread, which must take the GIL, when libzmq is done with
# it. Measured on the round trip of three 224x224x3 images (150 KB each) over 127.0.0.1 (2-core VM):
# 0.25-0.28 ms copied against 0.29-0.34 ms lent. Larger images are still lent.
COPY_THRESHOLD = 256 * 1024
_MONITORED_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
for _event in HANDSHAKE_FAILURES:
    _MONITORED_EVENTS |= _event


class ReplyFuture(Protocol):
    """What the core needs of a future: `concurrent.futures.Future` and `asyncio.Future` both are."""

    def done(self) -> bool: ...
    def cancel(self) -> bool: ...
    def set_result(self, result: Any) -> None: ...
    def set_exception(self, exception: BaseException) -> None: ...


@dataclasses.dataclass(eq=False)
class Pending:
    """A request sent and not yet answered: its frames are kept to be sent again after a reset."""

    future: ReplyFuture
    kind: str
    frames: list
    timeout_s: float
    tries_left: int
    created: float
    sent: float


class ClientCore:
    """One robot's DEALER to the policy server's ROUTER and the requests waiting on it.

    Not thread-safe: a driver calls it from one thread (the caller's, or the event loop's). The
    driver resolves nothing itself: it calls `read_replies` and `read_monitor` when those sockets
    are readable and `expire` at `next_deadline()`, and re-registers `socket` and `monitor` after
    `expire` returns True (they were replaced)."""

    def __init__(
        self,
        endpoint: str,
        robot_id: str,
        *,
        timeout_s: float,
        retries: int,
        connect_timeout_s: float,
        context: zmq.Context | None,
        keys: ClientKeys | None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.endpoint = zmq_endpoint(endpoint)
        self.robot_id = robot_id
        self.timeout_s = timeout_s
        self.retries = retries
        self.connect_timeout_s = connect_timeout_s
        self.keys = keys
        self.handshake_failure: str | None = None  # why the last security handshake failed
        self.reconnects = 0
        self.context = context or zmq.Context.instance()
        self._clock = clock
        self._ids = itertools.count(1)
        self.pending: dict[int, Pending] = {}
        # inproc endpoints report no connection events: they count as connected.
        self._monitored = not self.endpoint.startswith("inproc://")
        self.connected = not self._monitored
        self._down_since = clock()
        self.socket, self.monitor = self._open()

    # ------------------------------------------------------------------ sockets

    def _open(self) -> tuple[zmq.Socket, zmq.Socket | None]:
        socket = self.context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SNDHWM, QUEUE_LIMIT)
        socket.setsockopt(zmq.RCVHWM, QUEUE_LIMIT)
        socket.copy_threshold = COPY_THRESHOLD
        if self.keys is not None:
            apply_client(socket, self.keys)
        monitor = socket.get_monitor_socket(_MONITORED_EVENTS) if self._monitored else None
        socket.connect(self.endpoint)
        return socket, monitor

    def _close_sockets(self) -> None:
        if self.monitor is not None:
            self.socket.disable_monitor()
            self.monitor.close(linger=0)
        self.socket.close(linger=0)

    @property
    def closed(self) -> bool:
        return self.socket.closed

    def close(self) -> None:
        """Closes the sockets; requests still waiting are cancelled. Closing again does nothing."""
        if self.socket.closed:
            return
        for pending in self.pending.values():
            pending.future.cancel()
        self.pending.clear()
        self._close_sockets()

    # ------------------------------------------------------------------ requests

    def send(
        self,
        future: ReplyFuture,
        kind: str,
        prompt: str | None,
        options: Options | None,
        observation: Observation | None,
        refresh_interval: Any,
        guidance: ChunkGuidance | None,
        return_model_actions: bool,
        timeout_s: float | None,
        retries: int | None,
    ) -> None:
        """Sends a request; `future` gets the reply's `data` (with `actions`, and `model_actions`
        when asked, for an infer) or its error. Never blocks: a socket with no room fails it at once."""
        request_id = next(self._ids)
        frames = encode_request(
            kind, request_id, self.robot_id, prompt, options, observation, refresh_interval, guidance,
            return_model_actions,
        )  # fmt: skip
        now = self._clock()
        pending = Pending(
            future,
            kind,
            frames,
            self.timeout_s if timeout_s is None else timeout_s,
            self.retries if retries is None else retries,
            now,
            now,
        )
        try:
            send_frames(self.socket, frames, NOBLOCK, copy=False)
        except zmq.Again:
            future.set_exception(self._not_sendable())
            return
        self.pending[request_id] = pending

    def _not_sendable(self) -> TransportError:
        """Why a send found no room: a refused handshake leaves the socket no peer to queue for."""
        self.read_monitor()
        if self.handshake_failure is not None:
            return ServerUnreachable(f"cannot reach the policy server at {self.endpoint}: {self.handshake_failure}")
        return queue_full(self.endpoint)

    def read_replies(self) -> None:
        """Handles every reply waiting on the socket (the blocking driver; an event loop's reader
        calls `handle_reply` per message)."""
        # EVENTS, not a receive until `zmq.Again`: the exception costs more than the look.
        while readable(self.socket):
            self.handle_reply(recv_frames(self.socket))

    def handle_reply(self, frames: list) -> None:
        """Resolves the request a reply answers; drops an undecodable or late one."""
        try:
            header, arrays = codec.decode(frames)
        except ProtocolError as e:
            log.warning("dropped an undecodable reply from %s: %s", self.endpoint, e)
            return
        request_id = header.get("id")
        pending = self.pending.pop(request_id, None) if isinstance(request_id, int) else None
        if pending is None or pending.future.done():
            return  # a late reply to a request answered or abandoned already
        try:
            pending.future.set_result(reply_data(pending.kind, header, arrays))
        except TransportError as e:
            pending.future.set_exception(e)

    def read_monitor(self) -> None:
        """Handles every monitor event waiting (the blocking driver)."""
        while self.monitor is not None and self.monitor.poll(0):
            self.handle_monitor_event(self.monitor.recv_multipart())

    def handle_monitor_event(self, frames: list[bytes]) -> None:
        """Follows the connection's state: up once a handshake succeeded, down at a disconnection."""
        event = parse_monitor_message(frames)["event"]
        if event in HANDSHAKE_FAILURES:
            if self.handshake_failure != HANDSHAKE_FAILURES[event]:
                log.warning("%s: %s", self.endpoint, HANDSHAKE_FAILURES[event])
            self.handshake_failure = HANDSHAKE_FAILURES[event]
        elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.connected = True
            self.handshake_failure = None
        elif event == zmq.EVENT_DISCONNECTED and self.connected:
            self.connected = False
            self._down_since = self._clock()

    # ------------------------------------------------------------------ Lazy Pirate

    def next_deadline(self) -> float | None:
        """When `expire` has something to do next (None: nothing is waiting)."""
        deadlines = [p.sent + p.timeout_s for p in self.pending.values()]
        if not self.connected:
            deadlines += [max(self._down_since, p.created) + self.connect_timeout_s for p in self.pending.values()]
        return min(deadlines, default=None)

    def expire(self) -> bool:
        """Fails or resends the requests whose time is up and forgets cancelled ones; True when the
        sockets were replaced (the driver registers the new ones)."""
        now = self._clock()
        reset = False
        for request_id, p in list(self.pending.items()):
            if p.future.done():  # cancelled by its owner
                del self.pending[request_id]
            elif not self.connected and now - max(self._down_since, p.created) >= self.connect_timeout_s:
                del self.pending[request_id]
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
                    del self.pending[request_id]
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
        return reset

    def _reset(self) -> None:
        """A new socket (the old one's queue and late replies are gone), every request still
        waiting sent again."""
        self._close_sockets()
        if self.connected:
            self.connected = not self._monitored
            self._down_since = self._clock()
        self.socket, self.monitor = self._open()
        self.reconnects += 1
        now = self._clock()
        for request_id, p in list(self.pending.items()):
            p.sent = now
            try:
                send_frames(self.socket, p.frames, NOBLOCK, copy=False)
            except zmq.Again:
                del self.pending[request_id]
                p.future.set_exception(queue_full(self.endpoint))


FutureT = TypeVar("FutureT", bound=ReplyFuture)
ResultT = TypeVar("ResultT")


class ClientRequests(Generic[FutureT, ResultT]):
    """The requests of one robot, whatever drives the sockets. `send` and `start_infer` return the
    driver's future; `request`, `infer`, `subtask`, `set_refresh`, `ping` and `bye`
    return the driver's result of it: the reply's `data` itself (blocking) or a coroutine of it
    (asyncio). A driver supplies `_future`, `_sent` and `_result`.

    `timeout_s` and `retries` are the defaults of every request; `send`, `request`, `start_infer`,
    `set_refresh`, `ping` and `bye` take their own.
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
        self.core = ClientCore(
            endpoint, robot_id, timeout_s=timeout_s, retries=retries, connect_timeout_s=connect_timeout_s,
            context=context, keys=keys,
        )  # fmt: skip
        self.endpoint, self.robot_id = self.core.endpoint, robot_id

    def _future(self) -> FutureT:
        raise NotImplementedError

    def _sent(self) -> None:
        """After a send: what the driver must do to see its reply and its deadline."""
        raise NotImplementedError

    def _result(self, future: FutureT) -> ResultT:
        raise NotImplementedError

    @property
    def connected(self) -> bool:
        """Whether a connection to the server is up (as the socket monitor last said)."""
        return self.core.connected

    @property
    def reconnects(self) -> int:
        """How many times a timeout replaced the socket."""
        return self.core.reconnects

    @property
    def handshake_failure(self) -> str | None:
        """Why the last security handshake failed (None once one succeeded)."""
        return self.core.handshake_failure

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
    ) -> FutureT:
        """Sends a request without waiting. The future gives the reply's `data` (with `actions` for
        an infer, and `model_actions` when asked) or raises its error; cancel it to abandon the
        request."""
        future = self._future()
        self.core.send(
            future, kind, prompt, options, observation, refresh_interval, guidance, return_model_actions, timeout_s,
            retries,
        )  # fmt: skip
        self._sent()
        return future

    def request(self, *args: Any, **kwargs: Any) -> ResultT:
        """One request's reply `data`; `send`'s arguments."""
        return self._result(self.send(*args, **kwargs))

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
    ) -> FutureT:
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

    def infer(self, *args: Any, **kwargs: Any) -> ResultT:
        """An action chunk: the reply's fields (`subtask`, `timing`, ...) plus `actions` (an array);
        `start_infer`'s arguments."""
        return self._result(self.start_infer(*args, **kwargs))

    def subtask(
        self, images: Mapping[str, np.ndarray], high_level_prompt: str, state: np.ndarray | None = None, **options: Any
    ) -> ResultT:
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
    ) -> ResultT:
        """Sets (seconds), changes or clears (None) this robot's subtask refresh interval.

        The server refreshes from this robot's latest observation and prompt; an observation or
        prompt (with decoding `options`) given here becomes the latest. The reply includes the last
        refresh published, if any.
        """
        obs = Observation(images, state) if images else None
        opts = Options(**options) if high_level_prompt is not None else None
        return self.request(REFRESH, high_level_prompt, opts, obs, interval_s, timeout_s=timeout_s, retries=retries)

    def ping(self, *, timeout_s: float | None = None, retries: int | None = None) -> ResultT:
        return self.request(PING, timeout_s=timeout_s, retries=retries)

    def bye(self, *, timeout_s: float | None = None, retries: int | None = None) -> ResultT:
        """Ends this robot's session on the server (its refresh included)."""
        return self.request(BYE, timeout_s=timeout_s, retries=retries)
