"""The fleet's broker: one endpoint for robots in front of many policy workers (the command is
`python -m runtime.broker`; a front host runs it on a thread).

Robots connect to the broker's ROUTER and SUB to its XPUB exactly as they would to a single policy
server (same wire protocol, same errors); policy workers (`python -m runtime.policy_server --join
tcp://BROKER:PORT`, one engine each) connect a DEALER to its back ROUTER and publish their refreshes
into its XSUB. The request path follows the ZeroMQ guide's Paranoid Pirate broker: workers announce
READY, heartbeats go both ways, a worker silent for a few intervals is presumed dead. Requests are
routed by robot, not round-robin: a robot sticks to one worker while it lives (its session, batch and
refresh ticker are there), a new robot goes to the least-loaded worker, and when a worker dies its
requests in flight are answered `unavailable` (the robot asks again) and its robots are placed on a
live worker by their next request, which carries what the new worker needs (the control loop sends
its prompt, observation and refresh interval with every request, and the broker adds the refresh
interval a robot set earlier to its first request on the new worker; docs/protocol.md, section 6).

Refreshes go through an XSUB -> XPUB forwarder, libzmq's proxy in a loop of the broker's own: the
front XPUB's subscriptions are applied, bounded and counted by a `SubscriptionBook` as a single
server's are (under CURVE only to the subscriber's own topics), and the broker tells the workers
(through the XSUB, which tells every worker, and a worker that joins later at once) only of a topic's
first subscriber and of its last one leaving. So each worker's per-topic subscriber count, which ends
the sessions of robots that are gone, keeps working, as does its last-value replay.

The broker answers `ping` itself (the workers and their load), whatever the load: a ping is exempt
from the in-flight caps. Every front message is checked as the single server checks it (size, then
`codec.decode` and `build_request`, then the in-flight caps per identity, per principal and in all:
the same `transport.admission.Admission`), so the broker replies with the same typed errors and nothing a
robot sends can stop it; a request its worker holds past `request_timeout_s` is answered `timeout`
(the worker's late reply is dropped). Subscriptions at the front XPUB go through the same
`SubscriptionBook` as a single server's. A worker's malformed message is dropped and logged; a
malformed HEARTBEAT drops that worker. The sockets are plain ZMQ sockets polled on one thread.

A worker sees every request of its robots and its replies reach them, so the workers' side is as
sensitive as the robots'. Its tcp endpoints take CURVE with an allow-list of worker keys of their own
(`--worker-curve-secret/--worker-curve-clients`), checked by the same ZAP authenticator as the robots'
keys but in a ZAP domain of their own, so neither list lets a key in on the other side; a worker whose
key is not on the list fails the handshake and so is never sent a request. A front host's own workers
join over `ipc://` (a folder only its user can enter), which stays plain. A worker's principal (its key,
else its address) holds at most `max_workers_per_principal` places in the table, so neither one
key nor one host can fill it; a TCP worker endpoint without CURVE is warned about at start, loopback
included: any local process could join as a worker and read robots' requests.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import msgpack
import zmq

from runtime.fleet.heartbeat import DEFAULT_INTERVAL_S, DEFAULT_MISSES
from runtime.fleet.protocol import (
    COMMANDS,
    DISCONNECT,
    HEARTBEAT,
    READY,
    REPLY,
    Envelope,
    FleetProtocolError,
    message,
    payload,
    read_payload,
    read_seq,
    read_status,
    request_frames,
    split,
)
from runtime.fleet.routing import InFlight, Worker, WorkerTable
from transport import codec, curve
from transport.admission import Admission, AdmissionLimits, Observer, rejection
from transport.connections import Connections
from transport.errors import TransportError
from transport.heap import HeapTrimmer
from transport.messages import BYE, ERROR, KEEP, PING, REFRESH_INTERVAL, REPLY_TYPE, Request
from transport.server_info import ServerInfo
from transport.subscriptions import SUBSCRIBERS_DOMAIN, SubscriptionBook, SubscriptionLimits, configure_xpub
from transport.zap import ZapHandler
from transport.zmq_frames import NOBLOCK, recv_frames, send_frames
from transport.zmq_server import principal_of, send_to_peer

log = logging.getLogger(__name__)

BURST = 64  # messages read from one socket before looking at the others
WORKERS_DOMAIN = "workers"  # the ZAP domain of the workers' endpoints: worker keys only


@dataclasses.dataclass(frozen=True)
class BrokerSettings:
    router_endpoint: str | None = "tcp://127.0.0.1:5555"
    internal_endpoint: str | None = None  # ipc://... for the front host's WebSocket gateways
    pub_endpoints: tuple[str, ...] = ("tcp://127.0.0.1:5556",)
    backend_endpoint: str = "tcp://127.0.0.1:5557"  # workers' DEALERs connect here
    xsub_endpoint: str = "tcp://127.0.0.1:5558"  # workers' XPUBs connect here (told in the READY ack)
    # A front host's tcp pair for workers of other hosts, beside its ipc pair above (`--worker-port`).
    remote_backend_endpoint: str | None = None
    remote_xsub_endpoint: str | None = None
    heartbeat_s: float = DEFAULT_INTERVAL_S
    heartbeat_misses: int = DEFAULT_MISSES
    # The single server's bounds, with room for a fleet's requests in all.
    admission: AdmissionLimits = dataclasses.field(default_factory=lambda: AdmissionLimits(max_in_flight=1024))
    hwm: int = 1000
    # A request its worker holds this long is answered `timeout`: a worker that heartbeats but never
    # replies must not leave robots waiting forever.
    request_timeout_s: float = 30.0
    max_workers: int = 64
    max_workers_per_principal: int = 16  # places one worker key (else one worker address) may hold
    max_robots: int = 4096
    subscriptions: SubscriptionLimits = dataclasses.field(default_factory=SubscriptionLimits)
    # CURVE with an allow-list on the robots' tcp endpoints (`transport.curve`); the internal ROUTER
    # and ipc endpoints stay plain.
    curve: curve.ServerKeys | None = None
    # CURVE with an allow-list of worker keys (ZAP domain `WORKERS_DOMAIN`) on the workers' tcp endpoints.
    worker_curve: curve.ServerKeys | None = None


class Broker:
    """`bind()` (fast errors for a port in use), then `start()` (a thread) or `run(stop)`."""

    def __init__(
        self, settings: BrokerSettings, clock: Callable[[], float] = time.monotonic, observe: Observer | None = None
    ):
        self.settings = settings
        self._clock = clock
        self._observe = observe  # told of every answered request (metrics)
        self._ctx = zmq.Context()
        # The ZAP handler admits robots' keys (requests and subscriptions) and workers' keys, each in a
        # domain of its own, and names the front XPUB's connections (`transport.subscriptions`).
        self._auth: ZapHandler | None = curve.start_authenticator(
            self._ctx, settings.curve, curve.DEFAULT_DOMAIN, SUBSCRIBERS_DOMAIN
        )
        if settings.worker_curve is not None:
            curve.allow(self._auth, settings.worker_curve, WORKERS_DOMAIN)
        self.table = WorkerTable(
            settings.max_workers,
            settings.max_robots,
            settings.heartbeat_s,
            settings.heartbeat_misses,
            settings.max_workers_per_principal,
        )
        self._front: dict[bool, zmq.Socket] = {}  # internal? -> ROUTER
        self._xpub: zmq.Socket | None = None
        self.connections: Connections | None = None  # the front XPUB's tcp subscribers, to cut floods
        self.book: SubscriptionBook | None = None
        self._trimmer = HeapTrimmer(clock=clock)
        self._back: zmq.Socket | None = None
        self._xsub: zmq.Socket | None = None
        self._seq = itertools.count(1)
        self._poller: zmq.Poller | None = None
        self._handlers: dict[zmq.Socket, Callable[[list], None]] = {}
        self.admission = Admission(settings.admission)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = clock()
        self.epoch = time.time()
        self.errors: collections.Counter[str] = collections.Counter()
        self.forwarded = 0
        self.published = 0
        self.router_endpoint: str | None = None
        self.internal_endpoint: str | None = None
        self.pub_endpoints: list[str] = []
        self.backend_endpoint = ""
        self.remote_backend_endpoint: str | None = None
        self.xsub_endpoint = ""
        self._xsub_by_scheme: dict[str, str] = {}  # what the READY ack names, by the worker's `via`

    # ------------------------------------------------------------------ sockets

    def bind(self) -> None:
        """Binds every socket; raises `zmq.ZMQError` for an endpoint that cannot be bound."""
        s = self.settings
        try:
            for endpoint, internal in ((s.router_endpoint, False), (s.internal_endpoint, True)):
                if endpoint:
                    keys = None if internal else s.curve
                    self._front[internal], (bound,) = self._socket(zmq.ROUTER, endpoint, keys=keys)
                    if internal:
                        self.internal_endpoint = bound
                    else:
                        self.router_endpoint = bound
            if s.pub_endpoints:
                self._xpub, self.pub_endpoints = self._socket(zmq.XPUB, *s.pub_endpoints, keys=s.curve)
                assert self.connections is not None
                self.book = SubscriptionBook(
                    self._xpub, s.subscriptions, own_prefix=bool(s.curve), cut=self.connections.cut
                )
            backs = [e for e in (s.backend_endpoint, s.remote_backend_endpoint) if e]
            self._back, backs = self._socket(zmq.ROUTER, *backs, keys=s.worker_curve, domain=WORKERS_DOMAIN)
            self.backend_endpoint, self.remote_backend_endpoint = backs[0], (backs[1:] or [None])[0]
            xsubs = [e for e in (s.xsub_endpoint, s.remote_xsub_endpoint) if e]
            self._xsub, xsubs = self._socket(zmq.XSUB, *xsubs, keys=s.worker_curve, domain=WORKERS_DOMAIN)
            self.xsub_endpoint = xsubs[0]
            self._xsub_by_scheme = {e.partition("://")[0]: e for e in reversed(xsubs)}
        except zmq.ZMQError:
            self._close_sockets()
            raise

    def _socket(
        self, kind: int, *endpoints: str, keys: curve.ServerKeys | None = None, domain: str = curve.DEFAULT_DOMAIN
    ) -> tuple[zmq.Socket, list[str]]:
        """A socket bound to `endpoints`, and what each is bound to (in their order; a tcp port 0
        resolved). With `keys` its tcp endpoints are CURVE servers admitting `domain`'s allow-list."""
        s = self.settings
        sock = self._ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, s.hwm)
        sock.setsockopt(zmq.RCVHWM, s.hwm)
        if kind == zmq.ROUTER:
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            sock.setsockopt(zmq.MAXMSGSIZE, 2 * s.admission.max_message_bytes)
        elif kind == zmq.XPUB:
            # Every (un)subscription reaches the broker, which applies, counts and bounds them
            # (its book) and tells the workers only of the first and the last per topic.
            configure_xpub(sock)
            self.connections = Connections(sock)
        elif kind == zmq.XSUB:
            sock.setsockopt(zmq.MAXMSGSIZE, codec.MAX_HEADER_BYTES + 1024)  # a refresh is small
        try:
            return sock, curve.bind(sock, endpoints, keys, domain)
        except zmq.ZMQError:
            sock.close(linger=0)
            raise

    def start(self) -> None:
        """Serves on a thread of its own until `close()`."""
        if self._back is None:
            self.bind()
        self._thread = threading.Thread(target=self.run, name="fleet-broker", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self._close_sockets()

    def _close_sockets(self) -> None:
        if self.connections is not None:
            self.connections.close()
            self.connections = None
        for sock in (*self._front.values(), self._xpub, self._back, self._xsub):
            if sock is not None:
                sock.close(linger=0)
        self._front, self._xpub, self._back, self._xsub = {}, None, None, None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        self._ctx.term()

    # ------------------------------------------------------------------ the loop

    def run(self, stop: threading.Event | None = None) -> None:
        """Polls every socket until `stop` (or `close()`)."""
        stop = stop or self._stop
        while not stop.is_set() and not self._stop.is_set():
            self.step()

    def step(self, max_wait_s: float = 0.1) -> None:
        """One turn of the loop: waits (at most until a heartbeat is due) for messages, handles them,
        then `tick()`. Tests with an injected clock call it directly instead of `run`."""
        if self._poller is None:
            self._poller = zmq.Poller()
            for internal, sock in self._front.items():
                self._handlers[sock] = lambda frames, i=internal: self._on_front(i, frames)
            if self._xpub is not None and self.connections is not None:
                self._handlers[self._xpub] = self._on_subscription
                self._handlers[self.connections.monitor] = self.connections.on_event
            assert self._back is not None and self._xsub is not None
            self._handlers[self._back] = self._on_back
            self._handlers[self._xsub] = self._on_publication
            for sock in self._handlers:
                self._poller.register(sock, zmq.POLLIN)
        now = self._clock()
        wait_s = min([max_wait_s] + [w.liveness.until_next(now) for w in self.table.workers.values()])
        for sock, _ in self._poller.poll(max(0, int(wait_s * 1e3))):
            self._drain(sock, self._handlers[sock])
        self.tick()

    def _drain(self, sock: zmq.Socket, handle: Callable[[list], None]) -> None:
        for _ in range(BURST):
            try:
                frames = recv_frames(sock, NOBLOCK)
            except zmq.Again:
                return
            try:
                handle(frames)
            except Exception:  # one message must never stop the broker for everyone
                self.errors["internal"] += 1
                log.exception("failed to handle a message")

    def tick(self) -> None:
        """Heartbeats due now go out; workers presumed dead leave, their requests answered; requests
        held past their time are answered `timeout`."""
        now = self._clock()
        self._trimmer.maybe()
        for worker, flight in self.table.overdue(now - self.settings.request_timeout_s):
            self._settled(flight)
            self.errors["timeout"] += 1
            self._observed(flight, "timeout")
            log.warning("worker %r held request %r of robot %r past %.0f s", worker.name, flight.request_id,
                        flight.robot, self.settings.request_timeout_s)  # fmt: skip
            message_ = f"policy worker {worker.name} did not answer within {self.settings.request_timeout_s:g} s"
            self._to_front(flight.internal, flight.client, codec.encode(_error(flight, "timeout", message_)))
        for worker in self.table.expire(now):
            silent = now - worker.liveness.last_heard
            log.warning(
                "worker %r presumed dead (silent %.1f s); %d robots move, %d requests answered 'unavailable'",
                worker.name, silent, len(worker.robots), len(worker.in_flight),
            )  # fmt: skip
            self._abandon(worker, f"policy worker {worker.name} stopped answering; ask again")
        for worker in list(self.table.workers.values()):
            if worker.liveness.send_due(now):
                self._to_worker(worker.identity, message(HEARTBEAT))

    # ------------------------------------------------------------------ robots

    def _on_front(self, internal: bool, frames: list) -> None:
        identity, body = frames[0].bytes, frames[1:]
        received = self._clock()
        # Under CURVE every message on the public ROUTER carries its connection's ZAP User-Id.
        user = None if internal or not self.settings.curve else curve.user_id(frames[-1])
        principal = principal_of(frames[-1], identity, internal, user)
        request: Request | None = None
        try:
            request = self.admission.admit(body, identity, internal, principal)
            self._forward(internal, identity, user, principal, body, request, received)
        except TransportError as e:
            self.errors[e.code] += 1
            if self._observe is not None:
                robot, type_ = (request.robot, request.type) if request is not None else ("", "")
                self._observe(internal, robot, type_, e.code, self._clock() - received)
            self._reply(internal, identity, rejection(body, e))

    def _forward(
        self,
        internal: bool,
        identity: bytes,
        user: str | None,
        principal: str,
        body: list,
        request: Request,
        received: float,
    ) -> None:
        if request.type == PING:  # exempt from the caps: a health check answers under load
            if self._observe is not None:
                self._observe(internal, request.robot, PING, "ok", self._clock() - received)
            self._reply(internal, identity, self._pong(request.id))
            return
        key = curve.session_key(user, request.robot)  # the worker's session key: what sticks
        worker = self.table.placed(key) if request.type == BYE else self.table.route(key)
        if worker is not None and request.type != BYE:
            if request.refresh_interval is KEEP:
                interval = self.table.take_refresh(key)
                if interval is not None:  # a new worker for a refreshing robot: it needs the interval
                    body = [_with_refresh_interval(body[0], interval), *body[1:]]
            else:
                self.table.set_refresh(key, request.refresh_interval)
        if worker is None and request.type == BYE:
            data = {"dropped": False, "server_timing": {"total_ms": 0.0}}
            if self._observe is not None:
                self._observe(internal, request.robot, BYE, "ok", self._clock() - received)
            self._reply(
                internal, identity, {"type": REPLY_TYPE[BYE], "id": request.id, "robot": request.robot, "data": data}
            )
            return
        if worker is None:
            raise TransportError("no policy worker is connected to the broker; retry later", "unavailable")
        seq = next(self._seq)
        envelope = Envelope(seq, identity, internal, user, principal)
        if not self._to_worker(worker.identity, request_frames(envelope, body)):
            raise TransportError(f"policy worker {worker.name} cannot take requests now; retry later", "unavailable")
        worker.in_flight[seq] = InFlight(
            seq, internal, identity, request.id, request.robot, principal, received, request.type
        )
        self.admission.take(identity, internal, principal)
        self.forwarded += 1
        worker.routed += 1
        if request.type == BYE:
            self.table.leave(key)

    def _pong(self, request_id: Any) -> dict[str, Any]:
        now = self._clock()
        workers = list(self.table.workers.values())
        first = workers[0].info if workers else {}
        statuses = [w.status for w in workers]
        server = ServerInfo(
            uptime_s=now - self._started,
            epoch=self.epoch,
            healthy=any(st.get("healthy", True) for st in statuses),
            sessions=sum(st.get("sessions", 0) for st in statuses),
            refreshing=sum(st.get("refreshing", 0) for st in statuses),
            min_refresh_interval_s=first.get("server", {}).get("min_refresh_interval_s"),
        )
        broker = {
            "workers": self.table.snapshot(now),
            "robots": sum(len(w.robots) for w in workers),
            "in_flight": self.table.in_flight(),
            "forwarded": self.forwarded,
            "published": self.published,
            "workers_lost": self.table.lost,
            "robots_moved": self.table.moved,
        }
        data = {"server": server.to_wire(), "model": first.get("model", {}), "broker": broker}
        data["server_timing"] = {"total_ms": 0.0}
        return {"type": REPLY_TYPE[PING], "id": request_id, "data": data}

    def _reply(self, internal: bool, identity: bytes, header: dict[str, Any]) -> None:
        self._to_front(internal, identity, codec.encode(header))

    def _to_front(self, internal: bool, identity: bytes, frames: list) -> None:
        sock = self._front.get(internal)
        if sock is None:
            return
        send_to_peer(sock, identity, frames)

    def _abandon(self, worker: Worker, reason: str) -> None:
        for flight in worker.in_flight.values():
            self._settled(flight)
            self.errors["unavailable"] += 1
            self._observed(flight, "unavailable")
            self._to_front(flight.internal, flight.client, codec.encode(_error(flight, "unavailable", reason)))
        worker.in_flight.clear()

    def _settled(self, flight: InFlight) -> None:
        self.admission.settle(flight.client, flight.internal, flight.principal)

    def _observed(self, flight: InFlight, outcome: str) -> None:
        if self._observe is not None:
            self._observe(flight.internal, flight.robot, flight.type, outcome, self._clock() - flight.sent)

    # ------------------------------------------------------------------ workers

    def _to_worker(self, identity: bytes, frames: list) -> bool:
        """Whether the message went out (False: the worker is gone or not reading)."""
        assert self._back is not None
        try:
            send_frames(self._back, [identity, *frames], NOBLOCK, copy=False)
            return True
        except zmq.Again:
            log.warning("a policy worker is not reading (high-water mark)")
            return False
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            worker = self.table.remove(identity)
            if worker is not None:
                log.warning("worker %r is unreachable; its robots move", worker.name)
                self._abandon(worker, f"policy worker {worker.name} is gone; ask again")
            return False

    def _on_back(self, frames: list) -> None:
        identity = frames[0].bytes
        try:
            command, rest = split(frames[1:])
            self._from_worker(identity, command, rest)
        except FleetProtocolError as e:
            self.errors["worker_protocol"] += 1
            log.warning("dropped a malformed message from worker %s: %s", identity.hex(), e)

    def _from_worker(self, identity: bytes, command: bytes, rest: list) -> None:
        now = self._clock()
        if command == READY:  # under CURVE its frames carry the worker's key (the ZAP User-Id)
            key = curve.user_id(rest[-1]) if rest else None
            address = principal_of(rest[-1], identity, False, None) if rest else ""
            self._join(identity, read_payload(rest), now, key, address)
            return
        worker = self.table.heard(identity, now)
        if worker is None:
            if command != DISCONNECT:  # presumed dead, yet alive: it must join again (and start afresh)
                self._to_worker(identity, message(DISCONNECT))
            return
        if command == HEARTBEAT:
            try:
                worker.status = read_status(read_payload(rest))
            except FleetProtocolError as e:  # a worker that says nonsense is not one to send robots to
                self.table.remove(identity)
                self._to_worker(identity, message(DISCONNECT))
                self._abandon(worker, f"policy worker {worker.name} misbehaved; ask again")
                raise FleetProtocolError(f"{e}; worker {worker.name!r} dropped") from None
        elif command == REPLY:
            if not rest:
                raise FleetProtocolError("a REPLY has a seq")
            flight = self.table.replied(identity, read_seq(rest[0]))
            if flight is not None:
                self._settled(flight)
                if self._observe is not None:
                    self._observed(flight, _outcome(rest[1:]))
                self._to_front(flight.internal, flight.client, rest[1:])
        elif command == DISCONNECT:
            self.table.remove(identity)
            log.info("worker %r left", worker.name)
            self._abandon(worker, f"policy worker {worker.name} stopped; ask again")
        else:
            raise FleetProtocolError(f"a worker does not send {COMMANDS[command]}")

    def _join(self, identity: bytes, ready: dict[str, Any], now: float, key: str | None, address: str) -> None:
        name, capacity, info = ready.get("name"), ready.get("capacity", 1), ready.get("info", {})
        if not isinstance(name, str) or not 0 < len(name) <= 64:
            raise FleetProtocolError("READY needs a name of 1..64 characters")
        if not isinstance(capacity, int) or not 1 <= capacity <= 1024 or not isinstance(info, dict):
            raise FleetProtocolError("READY's capacity must be an integer 1..1024 and info a map")
        old = self.table.workers.get(identity)
        if old is not None:
            self._abandon(old, f"policy worker {name} restarted; ask again")
        try:
            self.table.join(identity, name, capacity, info, now, key or address)
        except OverflowError as e:
            log.warning("refused worker %r from %r: %s", name, key or address, e)
            self._to_worker(identity, message(DISCONNECT))
            return
        s = self.settings
        pub = self._xsub_by_scheme.get(str(ready.get("via")), self.xsub_endpoint)  # its transport's XSUB
        ack = {"pub": pub, "heartbeat_s": s.heartbeat_s, "misses": s.heartbeat_misses}
        self._to_worker(identity, message(READY, payload(ack)))
        log.info(
            "worker %r joined from %r (capacity %d; %d workers)%s",
            name, address, capacity, len(self.table.workers), f", key {key}" if key else "",
        )  # fmt: skip

    # ------------------------------------------------------------------ refreshes

    def _on_subscription(self, frames: list) -> None:
        """A robot's (un)subscription at the front XPUB: applied and counted by the book, and told
        upstream to every worker only when a topic gets its first subscriber or loses its last one."""
        assert self._xsub is not None and self.book is not None
        freed = self.book.departures + self.book.dropped
        for change in self.book.handle(frames[0]):
            if change.holders == (1 if change.subscribed else 0):
                try:
                    self._xsub.send(bytes([change.subscribed]) + change.topic, flags=zmq.NOBLOCK)
                except zmq.Again:
                    log.warning("the workers' refresh subscriptions are at their high-water mark; dropped one")
        if self.book.departures + self.book.dropped != freed:
            self._trimmer.freed()

    def _on_publication(self, frames: list) -> None:
        """A worker's refresh, to every subscriber of its topic."""
        if self._xpub is None or len(frames) != 2:
            return
        try:
            send_frames(self._xpub, frames, NOBLOCK, copy=False)
            self.published += 1
        except zmq.Again:
            log.warning("refresh publisher is at its high-water mark; dropped a message")


def _outcome(frames: list) -> str:
    """A worker's reply as the metrics count it: "ok", or its error code (read from its header)."""
    try:
        header = msgpack.unpackb(frames[0].bytes if isinstance(frames[0], zmq.Frame) else frames[0])
        return str(header["error"]["code"]) if header.get("type") == ERROR else "ok"
    except Exception:  # a worker's reply the robot will find malformed too
        return "bad_message"


def _error(flight: InFlight, code: str, message_: str) -> dict[str, Any]:
    """The error reply to a request forwarded to a worker, answered by the broker itself."""
    return {"type": ERROR, "id": flight.request_id, "robot": flight.robot, "error": {"code": code, "message": message_}}


def _with_refresh_interval(header_frame: Any, interval_s: float) -> bytes:
    """A request's header frame (decoded once already, so valid) with `subtask_refresh_interval` set."""
    header = msgpack.unpackb(header_frame.bytes if hasattr(header_frame, "bytes") else header_frame, raw=False)
    header["options"] = {**(header.get("options") or {}), REFRESH_INTERVAL: interval_s}
    return msgpack.packb(header, use_bin_type=True)
