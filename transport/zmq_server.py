"""The policy server's ZMQ side: ROUTERs for requests and an XPUB for subtask refreshes.

Two ROUTERs serve the same handler: the public one (robots' DEALERs over TCP) and an internal one
on an `ipc://` path that only the server's own WebSocket gateways reach. Robot names starting with
"@" are the gateways' (one per WebSocket connection); the public ROUTER refuses them, so no robot
can pose as a WebSocket client.

Every message is decoded and bounded on arrival (size first, then the header, then the arrays);
an unexpected exception while handling one message becomes a typed `internal` error reply to that
peer, logged once, and the server goes on. Each request runs in its own task, so a slow request
never holds up another client; replies are sent without blocking, so a peer that stops reading
loses its own replies and stalls nobody. Requests in flight are capped overall and per peer.

The sockets are plain (not `zmq.asyncio`) sockets of the server's own context (its own I/O
thread), read by an event-loop reader on their file descriptor that drains every waiting message:
pyzmq's asyncio futures cost more per message than the rest of the server's work together.

The XPUB publishes refreshes with the robot id as topic and keeps the last message of each topic
(the ZeroMQ guide's last-value cache, bounded): a subscriber of a robot's exact topic that joins late
gets its last message at once. Subscriptions are input like requests: the XPUB runs in manual mode
and every (un)subscription goes through a `SubscriptionBook` (`transport.subscriptions`: bounded
length, count and rate, per principal; an unsubscription ends only what its own connection
subscribed), so
the server knows how many subscribers each robot's topic has: a SUB that disconnects (its process
exited or was killed) unsubscribes. The addresses that flood subscriptions lose their connections
(`transport.connections`), and memory freed by subscribers that leave goes back to the system.

Each request is attributed to a principal: its CURVE key, else its connection's peer address (a
gateway's connection: its own name). In-flight caps apply per peer identity, per principal and in all;
`ping` is exempt from them, so a health check answers under load. The size bound and these caps are
`transport.admission`'s, which the fleet broker admits its robots' requests by too.

With `ZmqServerSettings.curve` the public ROUTER and the XPUB's tcp endpoints are CURVE servers
behind the context's ZAP handler (`transport.zap`, `transport.curve`): a peer whose key is not
allowed never gets a message through. Each request's `Peer.user` is its connection's User-Id, and a subscriber may
hold only topics of its own user.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
import numpy as np
import zmq

from transport import codec, curve
from transport.admission import Admission, AdmissionLimits, Observer, rejection
from transport.connections import Connections
from transport.errors import TransportError
from transport.heap import HeapTrimmer
from transport.messages import ERROR, PING, REPLY_TYPE, Request
from transport.subscriptions import SUBSCRIBERS_DOMAIN, SubscriptionBook, SubscriptionLimits, configure_xpub
from transport.zmq_frames import NOBLOCK, send_frames
from transport.zmq_reader import SocketReader

log = logging.getLogger(__name__)

Reply = tuple[dict[str, Any], dict[str, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class Peer:
    """Who sent a request: the ZMQ routing identity, and whether it came over the internal ROUTER."""

    identity: bytes
    internal: bool = False
    # The ZAP User-Id under CURVE: the client's public key, Z85 (40 chars); None without CURVE.
    user: str | None = None
    # Whom its sessions and requests count against (`principal_of`).
    principal: str = ""


def principal_of(frame: zmq.Frame, identity: bytes, internal: bool, user: str | None) -> str:
    """A request's principal: the CURVE key under CURVE, else the connection's peer address (a TCP
    client's IP), which a client cannot choose as it chooses its identity and robot names. A gateway's
    connection (internal) is its own principal, its identity: the gateway bounds its connections."""
    if not internal:
        if user is not None:
            return user
        try:
            address = frame.get("Peer-Address")
        except zmq.ZMQError:
            address = None
        if address:
            return address
    return f"@{identity.hex()}"


Handler = Callable[[Peer, Request], Awaitable[Reply]]


@dataclasses.dataclass(frozen=True)
class ZmqServerSettings:
    router_endpoint: str | None = "tcp://127.0.0.1:5555"
    internal_endpoint: str | None = None  # ipc://... for the WebSocket gateways
    pub_endpoints: tuple[str, ...] = ("tcp://127.0.0.1:5556",)
    admission: AdmissionLimits = dataclasses.field(default_factory=AdmissionLimits)
    hwm: int = 1000
    max_cached_topics: int = 4096  # last-value cache entries (one per robot with a refresh)
    subscriptions: SubscriptionLimits = dataclasses.field(default_factory=SubscriptionLimits)
    # CURVE with an allow-list on the public ROUTER and the XPUB's tcp endpoints (the internal
    # ROUTER and ipc endpoints stay plain: only this server's gateways reach them).
    curve: curve.ServerKeys | None = None


class Publisher:
    """XPUB with a bounded last-value cache per topic; its subscriptions are counted by `book`.

    A topic's last value is replayed at most once per `REPLAY_GAP_S`: it goes to every subscriber of
    the topic (who drop a copy by its `seq`), so a subscriber toggling a robot's topic must not make
    the robot's own listener receive it again and again."""

    REPLAY_GAP_S = 0.5

    def __init__(
        self,
        socket: zmq.Socket,
        max_topics: int,
        book: SubscriptionBook,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._socket = socket
        self._max_topics = max_topics
        self.book = book
        self._clock = clock
        # topic -> (its last message's frames, when it was last replayed)
        self._last: collections.OrderedDict[bytes, tuple[list[bytes], float]] = collections.OrderedDict()
        self._trimmer = HeapTrimmer()
        self.published = 0
        self.dropped = 0

    def subscribers(self, topic: str) -> int:
        """Subscriptions to exactly `topic`: a robot's own listener. A prefix subscription (a monitor
        listening to every robot) says nothing about whether that robot is still there."""
        return self.book.subscribers(topic.encode())

    def subscriptions(self) -> dict[bytes, int]:
        """Every subscription prefix and how many subscriptions hold it."""
        return self.book.subscriptions()

    def forget(self, topic: str) -> None:
        """Drops the topic's last value (its session is gone)."""
        self._last.pop(topic.encode(), None)

    async def publish(self, topic: str, payload: dict[str, Any]) -> None:
        frames = [topic.encode(), msgpack.packb({"v": codec.PROTOCOL_VERSION, **payload}, use_bin_type=True)]
        self._last[frames[0]] = (frames, -float("inf"))
        self._last.move_to_end(frames[0])
        while len(self._last) > self._max_topics:
            self._last.popitem(last=False)
        self._send(frames)
        self.published += 1

    def _send(self, frames: list[bytes]) -> None:
        try:
            self._socket.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1
            log.warning("refresh publisher is at its high-water mark; dropped a message")

    def on_subscription(self, frames: list) -> None:
        """Counts (un)subscriptions; a new subscription of a topic with a last value gets it at once."""
        freed = self.book.departures + self.book.dropped
        for change in self.book.handle(frames[0]):
            last = self._last.get(change.topic) if change.subscribed else None
            now = self._clock()
            if last is not None and now - last[1] >= self.REPLAY_GAP_S:
                self._last[change.topic] = (last[0], now)
                self._send(last[0])
        if self.book.departures + self.book.dropped != freed and not self._trimmer.due:
            self._trimmer.freed()
            try:
                asyncio.get_running_loop().call_later(self._trimmer.interval_s, self._trimmer.maybe)
            except RuntimeError:  # driven without a loop (a test): the trim waits for the next message
                pass
        self._trimmer.maybe()


class ZmqServer:
    """Bind first (`bind()`, before the model loads, so a port problem shows at once), then `start()`."""

    def __init__(self, settings: ZmqServerSettings, handler: Handler, observe: Observer | None = None):
        self.settings = settings
        self._handler = handler
        self._observe = observe
        self._ctx = zmq.Context()
        # The ZAP handler admits CURVE keys (robots' requests and subscriptions) and names the XPUB's
        # connections (`transport.subscriptions`).
        self._auth = (
            curve.start_authenticator(self._ctx, settings.curve, curve.DEFAULT_DOMAIN, SUBSCRIBERS_DOMAIN)
            if settings.curve or settings.pub_endpoints
            else None
        )
        self._routers: list[tuple[zmq.Socket, bool]] = []
        self._xpub: zmq.Socket | None = None
        self.connections: Connections | None = None  # the XPUB's tcp subscribers, to cut floods
        self.publisher: Publisher | None = None
        self._tasks: set[asyncio.Task] = set()
        self._readers: dict[zmq.Socket, SocketReader] = {}
        self.admission = Admission(settings.admission)
        self.router_endpoint: str | None = None
        self.internal_endpoint: str | None = None
        self.pub_endpoints: list[str] = []
        self.errors: Counter[str] = Counter()

    def bind(self) -> None:
        """Binds every socket; raises `zmq.ZMQError` for an endpoint that cannot be bound."""
        s = self.settings
        try:
            for endpoint, internal in ((s.router_endpoint, False), (s.internal_endpoint, True)):
                if endpoint:
                    router = self._router_socket(endpoint, None if internal else s.curve)
                    self._routers.append((router, internal))
                    bound = router.getsockopt_string(zmq.LAST_ENDPOINT)
                    if internal:
                        self.internal_endpoint = bound
                    else:
                        self.router_endpoint = bound
            if s.pub_endpoints:
                xpub = self._xpub = self._ctx.socket(zmq.XPUB)
                configure_xpub(xpub)
                xpub.setsockopt(zmq.SNDHWM, s.hwm)
                xpub.setsockopt(zmq.LINGER, 0)
                self.connections = Connections(xpub)
                self.pub_endpoints = curve.bind(xpub, s.pub_endpoints, s.curve)
                book = SubscriptionBook(xpub, s.subscriptions, own_prefix=bool(s.curve), cut=self.connections.cut)
                self.publisher = Publisher(xpub, s.max_cached_topics, book)
        except zmq.ZMQError:
            self._close_sockets()
            raise

    def _router_socket(self, endpoint: str, keys: curve.ServerKeys | None) -> zmq.Socket:
        s = self.settings
        router = self._ctx.socket(zmq.ROUTER)
        if keys is not None:
            curve.apply_server(router, keys)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        router.setsockopt(zmq.SNDHWM, s.hwm)
        router.setsockopt(zmq.RCVHWM, s.hwm)
        router.setsockopt(zmq.MAXMSGSIZE, 2 * s.admission.max_message_bytes)
        router.setsockopt(zmq.LINGER, 0)
        try:
            router.bind(endpoint)
        except zmq.ZMQError:
            router.close(linger=0)
            raise
        return router

    async def start(self) -> None:
        """Starts reading (binding first if `bind()` was not called)."""
        if not self._routers and self._xpub is None:
            self.bind()
        loop = asyncio.get_running_loop()
        for router, internal in self._routers:
            self._readers[router] = SocketReader(
                loop, router, lambda frames, r=router, i=internal: self._receive(r, i, frames)
            )
        if self._xpub is not None and self.publisher is not None and self.connections is not None:
            publisher, connections = self.publisher, self.connections
            self._readers[self._xpub] = SocketReader(
                loop, self._xpub, lambda frames: self._guard(publisher.on_subscription, frames)
            )
            self._readers[connections.monitor] = SocketReader(
                loop, connections.monitor, lambda frames: self._guard(connections.on_event, frames)
            )

    def _guard(self, handle: Callable[[list], None], frames: list) -> None:
        try:
            handle(frames)
        except Exception:
            log.exception("failed to handle a subscription message")

    async def publish(self, topic: str, payload: dict[str, Any]) -> None:
        """Publishes on the XPUB (a refresh scheduler's `publish`); nothing without a pub endpoint."""
        if self.publisher is not None and self._xpub is not None:
            await self.publisher.publish(topic, payload)
            self._kick(self._xpub)

    def _kick(self, sock: zmq.Socket) -> None:
        reader = self._readers.get(sock)
        if reader is not None:
            reader.kick()

    def subscribers(self, topic: str) -> int:
        return 0 if self.publisher is None else self.publisher.subscribers(topic)

    def forget(self, topic: str) -> None:
        if self.publisher is not None:
            self.publisher.forget(topic)

    async def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._close_sockets()

    def _close_sockets(self) -> None:
        for sock, _ in self._routers:
            sock.close(linger=0)
        if self.connections is not None:
            self.connections.close()
            self.connections = None
        if self._xpub is not None:
            self._xpub.close(linger=0)
        self._routers, self._xpub = [], None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        self._ctx.term()

    def _receive(self, router: zmq.Socket, internal: bool, frames: list) -> None:
        # Under CURVE every message on the public ROUTER carries its connection's ZAP User-Id.
        user = None if internal or not self.settings.curve else curve.user_id(frames[-1])
        identity = frames[0].bytes
        peer = Peer(identity, internal, user, principal_of(frames[-1], identity, internal, user))
        self.receive(peer, frames[1:], router)

    def receive(self, peer: Peer, body: list, router: Any) -> None:
        """Serves one request message of `peer`; the reply goes out as through a ROUTER, the peer's
        identity and then the reply's frames by `router.send`. The ROUTERs' readers call it, and so
        does a fleet worker for the requests its broker forwards (`runtime.fleet.worker_link`), with
        a sink that wraps the reply for the broker."""
        received = time.perf_counter()
        try:
            request = self.admission.admit(body, peer.identity, peer.internal, peer.principal)
        except TransportError as e:
            self._reject(router, peer, body, e, received)
            return
        counted = request.type != PING
        if counted:
            self.admission.take(peer.identity, peer.internal, peer.principal)
        self._tasks.add(asyncio.create_task(self._serve(router, peer, request, received, counted)))

    def _reject(self, router: zmq.Socket, peer: Peer, body: list, e: TransportError, received: float) -> None:
        self.errors[e.code] += 1
        log.info("rejected a message from %s (%r): %s", peer.identity.hex(), peer.principal, e.message)
        if self._observe is not None:
            self._observe(peer.internal, "", "", e.code, time.perf_counter() - received)
        self._send(router, peer.identity, rejection(body, e))

    async def _serve(self, router: zmq.Socket, peer: Peer, request: Request, received: float, counted: bool) -> None:
        try:
            data, arrays = await self._handler(peer, request)
            header = {"type": REPLY_TYPE[request.type], "id": request.id, "robot": request.robot, "data": data}
        except TransportError as e:
            header, arrays = self._error(request, e.code, e.message), {}
        except ValueError as e:
            header, arrays = self._error(request, "bad_request", str(e)), {}
        except Exception as e:
            log.exception("request %r of robot %r failed", request.id, request.robot)
            header, arrays = self._error(request, "internal", f"internal error: {type(e).__name__}: {e}"), {}
        finally:
            if counted:
                self.admission.settle(peer.identity, peer.internal, peer.principal)
            self._tasks.discard(asyncio.current_task())
        seconds = time.perf_counter() - received
        if "data" in header:
            header["data"]["server_timing"] = {"total_ms": seconds * 1e3}
        if self._observe is not None:
            outcome = header["error"]["code"] if "error" in header else "ok"
            self._observe(peer.internal, request.robot, request.type, outcome, seconds)
        self._send(router, peer.identity, header, arrays)
        self._kick(router)

    def _error(self, request: Request, code: str, message: str) -> dict[str, Any]:
        self.errors[code] += 1
        return {"type": ERROR, "id": request.id, "robot": request.robot, "error": {"code": code, "message": message}}

    def _send(self, router: zmq.Socket, identity: bytes, header: dict[str, Any], arrays: dict | None = None) -> None:
        send_to_peer(router, identity, codec.encode(header, arrays))


def send_to_peer(router: zmq.Socket, identity: bytes, frames: list) -> None:
    """A reply through a ROUTER that never blocks the loop: a peer that does not read (its queue at
    the high-water mark) loses this reply, and one that has left is skipped (ROUTER_MANDATORY)."""
    try:
        send_frames(router, [identity, *frames], NOBLOCK, copy=False)
    except zmq.Again:
        log.warning("peer %s is not reading (high-water mark); dropped its reply", identity.hex())
    except zmq.ZMQError as e:
        if e.errno != zmq.EHOSTUNREACH:
            raise
        log.info("peer %s left before its reply", identity.hex())
