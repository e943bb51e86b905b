"""A policy worker's link to its broker (`python -m runtime.policy_server --join tcp://BROKER:PORT`).

The worker runs one engine and the same `PolicyService` and `ZmqServer` request path as a single
server, but binds no public socket: a DEALER joins the broker's back ROUTER (READY with its name,
capacity and `ping`), and every request the broker forwards is handed to `ZmqServer.receive` with
the robot's own identity, gateway flag and authenticated user from the envelope, so sessions, bounds
and errors are exactly a single server's. Replies go back wrapped for the broker. Refreshes are
published on an XPUB of the worker's own (the `Publisher` of `transport.zmq_server`, with its
subscriber counts and last-value cache) that connects to the broker's XSUB, whose endpoint the
broker gives in its READY acknowledgement.

It is the ZeroMQ guide's Paranoid Pirate worker: HEARTBEAT every interval, and a broker silent for
`misses` intervals (or one that answers DISCONNECT: it presumed this worker dead) makes the worker
drop its sessions (their robots have been placed elsewhere), reconnect with backoff and join again.

With `keys` (`--join-curve-server-key/--join-curve-key`) the DEALER and the XPUB are CURVE clients of
the broker's worker-side key, so the link is encrypted and the worker talks only to that broker. A
broker that refuses the key (it is not on its `--worker-curve-clients`, or CURVE is on one side only)
is silent to this worker, as the handshake never completes: a socket monitor tells that apart from a
broker that is away, so the log names the refusal instead of a silence.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import TYPE_CHECKING, Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from runtime.fleet.heartbeat import DEFAULT_INTERVAL_S, DEFAULT_MISSES, Liveness
from runtime.fleet.protocol import (
    DISCONNECT,
    HEARTBEAT,
    READY,
    REQUEST,
    message,
    payload,
    read_payload,
    read_request,
    reply_frames,
    split,
)
from transport import curve
from transport.subscriptions import FROM_BROKER, SubscriptionBook, configure_xpub
from transport.supervise import supervise
from transport.zmq_frames import NOBLOCK, send_frames
from transport.zmq_reader import SocketReader
from transport.zmq_server import Peer, Publisher, ZmqServer

if TYPE_CHECKING:  # the fleet never imports the single server: the worker is handed its service
    from runtime.policy_server.service import PolicyService

log = logging.getLogger("runtime.fleet.worker_link")

MAX_BACKOFF_S = 8.0
_HANDSHAKE_FAILURES = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "the broker refused this worker's CURVE key (not in its --worker-curve-clients)",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "the security handshake with the broker failed (CURVE on one side only: "
    "--join-curve-server-key and --join-curve-key go with the broker's --worker-curve-secret)",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "the security handshake with the broker failed "
    "(is --join-curve-server-key the broker's worker-side key?)",
}


def tcp_host(endpoint: str) -> str | None:
    """The host of a `tcp://host:port` endpoint (an IPv6 address without its brackets); None for another transport."""
    scheme, _, rest = endpoint.partition("://")
    return rest.rpartition(":")[0].strip("[]") if scheme == "tcp" else None


class _ReplySink:
    """Where `ZmqServer` sends one request's reply, frame by frame as to a ROUTER (`send` with
    SNDMORE until the last frame): wrapped in REPLY for the broker, on the socket the request came
    on (a reply for a socket replaced since is dropped: the broker answered it)."""

    __slots__ = ("_link", "_parts", "_seq", "_socket")

    def __init__(self, link: WorkerLink, seq: int, socket: zmq.Socket):
        self._link, self._seq, self._socket = link, seq, socket
        self._parts: list = []

    def send(self, frame: Any, flags: int = 0, copy: bool = True) -> None:
        self._parts.append(frame)
        if flags & zmq.SNDMORE:
            return
        frames, self._parts = self._parts, []
        if self._socket is self._link.socket:
            self._link.send(reply_frames(self._seq, frames[1:]))


class WorkerLink:
    def __init__(
        self,
        broker_endpoint: str,
        name: str,
        server: ZmqServer,
        capacity: int = 1,
        max_cached_topics: int = 4096,
        hwm: int = 1000,
        keys: curve.ClientKeys | None = None,
    ):
        self.broker_endpoint = broker_endpoint
        self._keys = keys
        self.name = name
        self.capacity = capacity
        self._server = server
        self._hwm = hwm
        self._ctx = zmq.Context()
        self.socket: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        self._refused: str | None = None  # why the broker refused the last handshake, if it did
        self._reader: SocketReader | None = None
        self._xpub = self._ctx.socket(zmq.XPUB)
        configure_xpub(self._xpub, zap_domain=None)  # it connects: the broker's side names connections
        self._xpub.setsockopt(zmq.SNDHWM, hwm)
        self._xpub.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            curve.apply_client(self._xpub, keys)
        # Its one subscriber is the broker, which bounds the robots' subscriptions and forwards each
        # topic's first and last: the topic count is the only bound that matters here.
        self.publisher = Publisher(self._xpub, max_cached_topics, SubscriptionBook(self._xpub, FROM_BROKER))
        self._pub_reader: SocketReader | None = None
        self._pub_endpoint: str | None = None
        self._service: PolicyService | None = None
        self._liveness = Liveness.starting(0.0, DEFAULT_INTERVAL_S, DEFAULT_MISSES)
        self._task: asyncio.Task | None = None
        self._rejoin: asyncio.Event = asyncio.Event()
        self.joins = 0
        self.acked = asyncio.Event()

    # ------------------------------------------------------------------ the service's publisher

    async def publish(self, topic: str, message_: dict[str, Any]) -> None:
        await self.publisher.publish(topic, message_)
        if self._pub_reader is not None:
            self._pub_reader.kick()

    def subscribers(self, topic: str) -> int:
        return self.publisher.subscribers(topic)

    def forget(self, topic: str) -> None:
        self.publisher.forget(topic)

    # ------------------------------------------------------------------ life

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()

    async def start(self, service: PolicyService) -> None:
        """Joins the broker and keeps the link alive (heartbeats, rejoining) until `close()`."""
        self._service = service
        loop = asyncio.get_running_loop()
        self._pub_reader = SocketReader(loop, self._xpub, self._on_subscription)
        self._open()
        self._task = asyncio.create_task(supervise("fleet-link", self._keep_alive), name="fleet-link")

    def _open(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, self._hwm)
        sock.setsockopt(zmq.RCVHWM, self._hwm)
        if self._keys is not None:
            curve.apply_client(sock, self._keys)
        self._monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | sum(_HANDSHAKE_FAILURES))
        self._refused = None
        sock.connect(self.broker_endpoint)
        self.socket = sock
        self._reader = SocketReader(asyncio.get_running_loop(), sock, self._on_message)
        self._liveness = Liveness.starting(self._now(), self._liveness.interval_s, self._liveness.misses)
        self.acked.clear()
        assert self._service is not None
        ready = {"name": self.name, "capacity": self.capacity, "pid": os.getpid(), "info": self._service.ping()}
        ready["via"] = self.broker_endpoint.partition("://")[0]  # the broker answers with its XSUB of this transport
        with contextlib.suppress(zmq.Again):  # no broker to queue for (a refused key): the liveness check rejoins
            self.send(message(READY, payload(ready)))
        self.joins += 1

    def _close_socket(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._monitor is not None:
            assert self.socket is not None
            self.socket.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None
        if self.socket is not None:
            self.socket.close(linger=0)
            self.socket = None

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        with contextlib.suppress(zmq.Again):
            self.send(message(DISCONNECT))
        self._close_socket()
        if self._pub_reader is not None:
            self._pub_reader.close()
        self._xpub.close(linger=0)
        self._ctx.term()

    def send(self, frames: list) -> None:
        """Sends without blocking (`zmq.Again` when the broker is not reading: the caller's to handle)."""
        if self.socket is None:
            return
        send_frames(self.socket, frames, NOBLOCK, copy=False)
        if self._reader is not None:
            self._reader.kick()

    async def _keep_alive(self) -> None:
        backoff = 0
        while True:
            live = self._liveness
            try:
                await asyncio.wait_for(self._rejoin.wait(), live.until_next(self._now()))
            except TimeoutError:
                pass
            now = self._now()
            if self._rejoin.is_set() or live.dead(now):
                self._read_monitor()
                why = (
                    "the broker asked"
                    if self._rejoin.is_set()
                    else self._refused or f"the broker is silent ({now - live.last_heard:.1f} s)"
                )
                self._rejoin.clear()
                backoff = min(backoff + 1, 6)
                delay = min(MAX_BACKOFF_S, live.interval_s * 2 ** (backoff - 1))
                log.warning("%s: dropping this worker's sessions, joining again in %.1f s", why, delay)
                self._drop_sessions()
                self._close_socket()
                await asyncio.sleep(delay)
                self._open()
                continue
            if self.acked.is_set():
                backoff = 0
            if live.send_due(now):
                with_status = payload(self._status())
                try:
                    self.send(message(HEARTBEAT, with_status))
                except zmq.Again:  # no room: a broker not reading, or none to queue for (a refused key)
                    self._read_monitor()
                    if self._refused is None:
                        log.warning("the broker is not reading (high-water mark); a heartbeat was dropped")

    def _read_monitor(self) -> None:
        """Brings `_refused` up to date with the monitor's events: why the last CURVE handshake with
        the broker failed, or None once one succeeded."""
        while self._monitor is not None and self._monitor.poll(0):
            self._refused = _HANDSHAKE_FAILURES.get(recv_monitor_message(self._monitor)["event"])

    def _status(self) -> dict[str, Any]:
        service = self._service
        assert service is not None
        return {
            "sessions": len(service.sessions),
            "refreshing": service.scheduler.active(),
            "healthy": bool(service.backend.healthy),
        }

    def _drop_sessions(self) -> None:
        assert self._service is not None
        for key in list(self._service.sessions):
            self._service.drop_session(key)

    # ------------------------------------------------------------------ messages

    def _on_message(self, frames: list) -> None:
        try:
            command, rest = split(frames)
            self._liveness.heard(self._now())
            if command == REQUEST:
                envelope, body = read_request(rest)
                peer = Peer(envelope.identity, envelope.internal, envelope.user, envelope.principal)
                assert self.socket is not None
                self._server.receive(peer, body, _ReplySink(self, envelope.seq, self.socket))
            elif command == READY:
                self._on_ack(read_payload(rest))
            elif command == DISCONNECT:
                self._rejoin.set()
        except (ValueError, zmq.ZMQError) as e:  # a FleetProtocolError, a bad heartbeat or pub endpoint
            log.warning("dropped a malformed message from the broker: %s", e)

    def _on_ack(self, ack: dict[str, Any]) -> None:
        interval, misses, pub = ack.get("heartbeat_s"), ack.get("misses"), ack.get("pub")
        if isinstance(interval, int | float) and isinstance(misses, int):
            self._liveness = Liveness.starting(self._now(), float(interval), misses)
        if isinstance(pub, str) and pub != self._pub_endpoint:
            host = tcp_host(self.broker_endpoint)
            if host is not None and pub.startswith("tcp://"):
                pub = f"tcp://{host}:{pub.rpartition(':')[2]}"
            if self._pub_endpoint is not None:
                self._xpub.disconnect(self._pub_endpoint)
            self._xpub.connect(pub)
            self._pub_endpoint = pub
        self.acked.set()
        log.info("joined the broker at %s as %s", self.broker_endpoint, self.name)

    def _on_subscription(self, frames: list) -> None:
        try:
            self.publisher.on_subscription(frames)
        except Exception:
            log.exception("failed to handle a subscription message")
