"""The policy server's ZMQ side: a ROUTER for requests and an XPUB for subtask refreshes.

The ROUTER answers each DEALER by identity. Every request runs in its own task, so a slow
request never holds up another client; replies are sent without blocking, so a peer that stops
reading loses its own replies and stalls nobody. Every buffer has a bound: socket HWMs, a message
size limit answered with a typed `oversize` error (ZMQ's own `MAXMSGSIZE` is a backstop at twice
that, which drops the peer), and a cap on requests in flight, overall and per peer.

The XPUB publishes refreshes with the robot id as topic and keeps the last message of each topic:
a subscriber that joins late gets it at once (the ZeroMQ guide's last-value cache).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
import numpy as np
import zmq
import zmq.asyncio

from transport import codec
from transport.errors import BadRequest, ProtocolError, TransportError
from transport.messages import ERROR, REPLY_TYPE, Request, parse_options, split_observation

log = logging.getLogger(__name__)

Reply = tuple[dict[str, Any], dict[str, np.ndarray]]
Handler = Callable[[Request], Awaitable[Reply]]


@dataclasses.dataclass(frozen=True)
class ZmqServerSettings:
    router_endpoint: str = "tcp://127.0.0.1:5555"
    pub_endpoint: str | None = "tcp://127.0.0.1:5556"
    max_message_bytes: int = 32 * 1024 * 1024
    hwm: int = 1000
    max_in_flight: int = 256
    max_in_flight_per_peer: int = 16


def _header_id(frames: list) -> Any:
    """Best effort: the request id of a message that failed to decode, so the error can name it."""
    try:
        header = msgpack.unpackb(frames[0].buffer, raw=False, max_bin_len=0)
        return header.get("id") if isinstance(header, dict) else None
    except Exception:  # any garbage: the error reply then carries no id
        return None


class Publisher:
    """XPUB with a last-value cache per topic."""

    def __init__(self, socket: zmq.asyncio.Socket):
        self._socket = socket
        self._last: dict[bytes, list[bytes]] = {}
        self.published = 0

    async def publish(self, topic: str, payload: dict[str, Any]) -> None:
        frames = [topic.encode(), msgpack.packb({"v": codec.PROTOCOL_VERSION, **payload}, use_bin_type=True)]
        self._last[frames[0]] = frames
        await self._send(frames)
        self.published += 1

    async def _send(self, frames: list[bytes]) -> None:
        try:
            await self._socket.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            log.warning("refresh publisher is at its high-water mark; dropped a message")

    async def serve_subscriptions(self) -> None:
        """Replays the last value of every topic a new subscription covers."""
        while True:
            msg = await self._socket.recv()
            if msg and msg[0] == 1:
                prefix = msg[1:]
                for topic, frames in list(self._last.items()):
                    if topic.startswith(prefix):
                        await self._send(frames)


class ZmqServer:
    def __init__(self, settings: ZmqServerSettings, handler: Handler, context: zmq.asyncio.Context | None = None):
        self.settings = settings
        self._handler = handler
        self._ctx = context or zmq.asyncio.Context.instance()
        self._router: zmq.asyncio.Socket | None = None
        self._xpub: zmq.asyncio.Socket | None = None
        self.publisher: Publisher | None = None
        self._tasks: set[asyncio.Task] = set()
        self._loops: list[asyncio.Task] = []
        self._in_flight: Counter[bytes] = Counter()
        self.router_endpoint: str | None = None
        self.pub_endpoint: str | None = None
        self.errors: Counter[str] = Counter()

    async def start(self) -> None:
        s = self.settings
        router = self._ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        router.setsockopt(zmq.SNDHWM, s.hwm)
        router.setsockopt(zmq.RCVHWM, s.hwm)
        router.setsockopt(zmq.MAXMSGSIZE, 2 * s.max_message_bytes)
        router.setsockopt(zmq.LINGER, 0)
        router.bind(s.router_endpoint)
        self._router = router
        self.router_endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
        self._loops.append(asyncio.create_task(self._receive(), name="zmq-router"))
        if s.pub_endpoint:
            xpub = self._ctx.socket(zmq.XPUB)
            xpub.setsockopt(zmq.XPUB_VERBOSE, 1)
            xpub.setsockopt(zmq.SNDHWM, s.hwm)
            xpub.setsockopt(zmq.LINGER, 0)
            xpub.bind(s.pub_endpoint)
            self._xpub = xpub
            self.pub_endpoint = xpub.getsockopt_string(zmq.LAST_ENDPOINT)
            self.publisher = Publisher(xpub)
            self._loops.append(asyncio.create_task(self.publisher.serve_subscriptions(), name="zmq-xpub"))

    async def publish(self, topic: str, payload: dict[str, Any]) -> None:
        """Publishes on the XPUB (a refresh scheduler's `publish`); nothing without a pub endpoint."""
        if self.publisher is not None:
            await self.publisher.publish(topic, payload)

    async def close(self) -> None:
        for task in [*self._loops, *self._tasks]:
            task.cancel()
        await asyncio.gather(*self._loops, *self._tasks, return_exceptions=True)
        for sock in (self._router, self._xpub):
            if sock is not None:
                sock.close(linger=0)

    async def _receive(self) -> None:
        assert self._router is not None
        while True:
            frames = await self._router.recv_multipart(copy=False)
            received = time.perf_counter()
            identity, body = frames[0].bytes, frames[1:]
            try:
                size = sum(len(f) for f in body)
                if size > self.settings.max_message_bytes:
                    raise ProtocolError(
                        f"message is {size} bytes, more than the server's limit of {self.settings.max_message_bytes}",
                        "oversize",
                    )
                header, arrays = codec.decode(body)
                request = self._request(header, arrays, identity)
                if sum(self._in_flight.values()) >= self.settings.max_in_flight:
                    raise TransportError("the server has too many requests in flight; retry later", "busy")
                if self._in_flight[identity] >= self.settings.max_in_flight_per_peer:
                    raise TransportError(
                        f"this client has {self._in_flight[identity]} requests in flight, the limit", "busy"
                    )
            except TransportError as e:
                self.errors[e.code] += 1
                log.info("rejected a message from %s: %s", identity.hex(), e.message)
                await self._send(identity, {"type": ERROR, "id": _header_id(body), "error": e.to_wire()})
                continue
            self._in_flight[identity] += 1
            task = asyncio.create_task(self._serve(identity, request, received))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _request(self, header: dict[str, Any], arrays: dict[str, np.ndarray], identity: bytes) -> Request:
        kind = header.get("type")
        if kind not in REPLY_TYPE:
            raise ProtocolError(f"unknown message type {kind!r}; known: {sorted(REPLY_TYPE)}", "unknown_type")
        robot = header.get("robot") or identity.hex()
        if not isinstance(robot, str) or len(robot) > 256:
            raise BadRequest(f"robot must be a string of at most 256 characters, got {robot!r}")
        request_id = header.get("id")
        if request_id is not None and not isinstance(request_id, int | str):
            raise BadRequest(f"id must be an integer or a string, got {request_id!r}")
        return Request(
            type=kind,
            id=request_id,
            robot=robot,
            options=parse_options(header.get("options")),
            observation=split_observation(arrays, header.get("ts")),
        )

    async def _serve(self, identity: bytes, request: Request, received: float) -> None:
        try:
            data, arrays = await self._handler(request)
            header = {"type": REPLY_TYPE[request.type], "id": request.id, "robot": request.robot, "data": data}
        except TransportError as e:
            header, arrays = self._error(request, e.code, e.message), {}
        except ValueError as e:
            header, arrays = self._error(request, "bad_request", str(e)), {}
        except Exception as e:
            log.exception("request %r of robot %s failed", request.id, request.robot)
            header, arrays = self._error(request, "internal", f"internal error: {type(e).__name__}: {e}"), {}
        finally:
            self._in_flight[identity] -= 1
            if self._in_flight[identity] <= 0:
                del self._in_flight[identity]
        if "data" in header:
            header["data"]["server_timing"] = {"total_ms": (time.perf_counter() - received) * 1e3}
        await self._send(identity, header, arrays)

    def _error(self, request: Request, code: str, message: str) -> dict[str, Any]:
        self.errors[code] += 1
        return {"type": ERROR, "id": request.id, "robot": request.robot, "error": {"code": code, "message": message}}

    async def _send(self, identity: bytes, header: dict[str, Any], arrays: dict[str, np.ndarray] | None = None) -> None:
        assert self._router is not None
        try:
            await self._router.send_multipart([identity, *codec.encode(header, arrays)], flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            log.warning("peer %s is not reading (high-water mark); dropped its reply", identity.hex())
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            log.info("peer %s left before its reply", identity.hex())
