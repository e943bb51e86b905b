"""The broker's table of workers: who is alive, which worker each robot sticks to, what is in flight.

A robot (its session key) stays on the worker it was first given while that worker lives: its
session, its batch and its refresh ticker are there. A new robot goes to the least-loaded live worker
(robots per unit of capacity, then requests in flight). A worker presumed dead (heartbeats missed) or
gone (DISCONNECT) leaves the table with its robots, which the next request places again, and with its
requests in flight, which the broker answers `unavailable`. The table also remembers the refresh
interval each robot last set, so the broker can hand it to the robot's new worker with the robot's
first request there (`take_refresh`): a client that set it once keeps its refreshes through a move.

Everything is bounded: workers (`max_workers`, and `max_per_principal` for one worker key or
address, so that no one key or host can fill the table), robots remembered (`max_robots`, least
recently seen forgotten first: a forgotten robot is placed again like a new one). No sockets and no clock of
its own: the broker passes `now`, so tests step it.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

from runtime.fleet.heartbeat import DEFAULT_INTERVAL_S, DEFAULT_MISSES, Liveness


@dataclasses.dataclass(frozen=True)
class InFlight:
    """A request forwarded to a worker, for its reply (or its `unavailable` answer)."""

    seq: int
    internal: bool  # which front ROUTER the robot is on
    client: bytes  # the robot's routing identity there
    request_id: Any
    robot: str
    principal: str = ""  # whom it counts against (`transport.zmq_server.principal_of`)
    sent: float = 0.0  # when it went to the worker (the broker's clock)
    type: str = ""  # its request type (the metrics' label)


@dataclasses.dataclass(eq=False)
class Worker:
    identity: bytes
    name: str
    capacity: int
    liveness: Liveness
    info: dict[str, Any]  # what the worker's own `ping` said in READY
    principal: str = ""  # its CURVE key, else its address
    status: dict[str, Any] = dataclasses.field(default_factory=dict)  # its latest HEARTBEAT
    robots: set[str] = dataclasses.field(default_factory=set)
    in_flight: dict[int, InFlight] = dataclasses.field(default_factory=dict)
    routed: int = 0  # requests sent to it
    served: int = 0  # replies it sent back

    def load(self) -> tuple[float, float, str]:
        return len(self.robots) / self.capacity, len(self.in_flight) / self.capacity, self.name


class WorkerTable:
    def __init__(
        self,
        max_workers: int = 64,
        max_robots: int = 4096,
        interval_s: float = DEFAULT_INTERVAL_S,
        misses: int = DEFAULT_MISSES,
        max_per_principal: int = 16,
    ):
        self.max_workers = max_workers
        self.max_per_principal = max_per_principal
        self.max_robots = max_robots
        self.interval_s = interval_s
        self.misses = misses
        self.workers: dict[bytes, Worker] = {}
        self._placed: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._refresh: dict[str, float] = {}  # robot -> the refresh interval it set last
        self._orphans: set[str] = set()  # refreshing robots whose worker left: their next request says so
        self.moved = 0  # robots whose worker left the table
        self.lost = 0  # workers presumed dead

    # ------------------------------------------------------------------ workers

    def join(
        self, identity: bytes, name: str, capacity: int, info: dict[str, Any], now: float, principal: str = ""
    ) -> Worker:
        """Adds a worker that sent READY (again: a worker that reconnected starts afresh). Raises
        `OverflowError` when the table, or the share of `principal` (the worker's key, else its
        address), is full."""
        old = self.workers.pop(identity, None)
        if old is not None:
            self._release(old)
        if len(self.workers) >= self.max_workers:
            raise OverflowError(f"the broker holds {self.max_workers} workers, its limit")
        if principal and sum(w.principal == principal for w in self.workers.values()) >= self.max_per_principal:
            raise OverflowError(f"{self.max_per_principal} workers of the same key or address are joined, the limit")
        liveness = Liveness.starting(now, self.interval_s, self.misses)
        worker = Worker(identity, name, max(1, capacity), liveness, info, principal)
        self.workers[identity] = worker
        return worker

    def heard(self, identity: bytes, now: float) -> Worker | None:
        worker = self.workers.get(identity)
        if worker is not None:
            worker.liveness.heard(now)
        return worker

    def remove(self, identity: bytes) -> Worker | None:
        """Takes a worker out (it said DISCONNECT, or cannot be reached); its robots are placed
        again on their next request, its requests in flight are the caller's to answer."""
        worker = self.workers.pop(identity, None)
        if worker is not None:
            self._release(worker)
        return worker

    def expire(self, now: float) -> list[Worker]:
        """Removes and returns the workers presumed dead at `now`."""
        dead = [w for w in self.workers.values() if w.liveness.dead(now)]
        for worker in dead:
            self.remove(worker.identity)
        self.lost += len(dead)
        return dead

    def _release(self, worker: Worker) -> None:
        for robot in worker.robots:
            if self._placed.get(robot) == worker.identity:
                del self._placed[robot]
            if robot in self._refresh:
                self._orphans.add(robot)
        self.moved += len(worker.robots)

    # ------------------------------------------------------------------ robots

    def placed(self, robot: str) -> Worker | None:
        """The worker `robot` sticks to, if any."""
        identity = self._placed.get(robot)
        return None if identity is None else self.workers.get(identity)

    def route(self, robot: str) -> Worker | None:
        """The worker for `robot`'s request: its own while it lives, else the least-loaded one
        (None when no worker is connected)."""
        worker = self.placed(robot)
        if worker is None:
            if not self.workers:
                return None
            worker = min(self.workers.values(), key=Worker.load)
            worker.robots.add(robot)
            self._placed[robot] = worker.identity
            while len(self._placed) > self.max_robots:
                gone, identity = self._placed.popitem(last=False)
                owner = self.workers.get(identity)
                if owner is not None:
                    owner.robots.discard(gone)
                self._forget_refresh(gone)
        self._placed.move_to_end(robot)
        return worker

    def leave(self, robot: str) -> None:
        """`robot` said bye: its next request is placed like a new robot's."""
        identity = self._placed.pop(robot, None)
        worker = None if identity is None else self.workers.get(identity)
        if worker is not None:
            worker.robots.discard(robot)
        self._forget_refresh(robot)

    def set_refresh(self, robot: str, interval_s: float | None) -> None:
        """What `robot`'s request set its refresh interval to (None: cleared). Call after `route`."""
        if interval_s is None:
            self._forget_refresh(robot)
        elif robot in self._placed:
            self._refresh[robot] = interval_s
            self._orphans.discard(robot)

    def take_refresh(self, robot: str) -> float | None:
        """The refresh interval to hand to `robot`'s new worker, once, if its old worker left."""
        if robot not in self._orphans:
            return None
        self._orphans.discard(robot)
        return self._refresh.get(robot)

    def _forget_refresh(self, robot: str) -> None:
        self._refresh.pop(robot, None)
        self._orphans.discard(robot)

    # ------------------------------------------------------------------ requests

    def in_flight(self) -> int:
        return sum(len(w.in_flight) for w in self.workers.values())

    def overdue(self, sent_before: float) -> list[tuple[Worker, InFlight]]:
        """Takes out and returns the requests sent to a worker before `sent_before` and not answered."""
        late = []
        for worker in self.workers.values():
            while worker.in_flight:  # oldest first: in the order they were sent
                seq, flight = next(iter(worker.in_flight.items()))
                if flight.sent >= sent_before:
                    break
                late.append((worker, worker.in_flight.pop(seq)))
        return late

    def replied(self, identity: bytes, seq: int) -> InFlight | None:
        """The request a REPLY answers (None: unknown worker, or answered already)."""
        worker = self.workers.get(identity)
        if worker is None:
            return None
        flight = worker.in_flight.pop(seq, None)
        if flight is not None:
            worker.served += 1
        return flight

    def snapshot(self, now: float) -> list[dict[str, Any]]:
        """What `ping` reports per worker."""
        return [
            {
                "name": w.name,
                "capacity": w.capacity,
                "robots": len(w.robots),
                "in_flight": len(w.in_flight),
                "served": w.served,
                "last_heard_s": round(now - w.liveness.last_heard, 3),
                **{k: w.status[k] for k in ("sessions", "refreshing", "healthy") if k in w.status},
            }
            for w in sorted(self.workers.values(), key=lambda w: w.name)
        ]
