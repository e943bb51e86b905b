"""The robot side of the ZMQ transport: the blocking DEALER client.

`PolicyClient` is what a robot uses: a plain DEALER on the caller's thread, so a request is a send,
a poll and a receive with no event loop in between. Its requests, and what it does with its sockets
(Lazy Pirate retries, replies matched by id, an unreachable server reported within
`connect_timeout_s`, CURVE), are `transport.zmq_client_core`'s, shared with the asyncio
`transport.zmq_async_client.AsyncPolicyClient`: the same methods, returning the same values.

Several requests can be in flight (`send` returns a future, `poll` makes progress, `wait` blocks for
one), which is how a control loop pipelines without a thread. Refreshes arrive on SUB sockets that
the same calls poll, so their callbacks run on the caller's thread, inside the client's calls.
"""

from __future__ import annotations

import concurrent.futures
import math
import time
from collections.abc import Callable
from typing import Any

import zmq

from transport.refresh_listener import RefreshListener
from transport.zmq_client_core import ClientRequests


class PolicyClient(ClientRequests[concurrent.futures.Future, dict[str, Any]]):
    """Requests to the policy server's ROUTER from one robot, on the caller's thread (not
    thread-safe); the settings are `ClientRequests`'."""

    def __init__(self, endpoint: str, robot_id: str, **settings: Any):
        super().__init__(endpoint, robot_id, **settings)
        self._listeners: list[tuple[zmq.Socket, RefreshListener]] = []
        self._poller = self._register()

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _register(self) -> zmq.Poller:
        poller = zmq.Poller()
        poller.register(self.core.socket, zmq.POLLIN)
        if self.core.monitor is not None:
            poller.register(self.core.monitor, zmq.POLLIN)
        for sub, _ in self._listeners:
            poller.register(sub, zmq.POLLIN)
        return poller

    def close(self) -> None:
        """Closes the sockets; requests still in flight are cancelled. Closing again does nothing."""
        self.core.close()
        for sub, _ in self._listeners:
            sub.close(linger=0)
        self._listeners.clear()

    def _future(self) -> concurrent.futures.Future:
        return concurrent.futures.Future()

    def _sent(self) -> None:
        """Nothing: `poll` and `wait` look at the socket and the deadlines."""

    def _result(self, future: concurrent.futures.Future) -> dict[str, Any]:
        return self.wait(future)

    def wait(self, future: concurrent.futures.Future) -> dict[str, Any]:
        """Blocks until `future` (from `send`) is resolved; its result."""
        while not future.done():
            deadline = self.core.next_deadline()
            self.poll(0.0 if deadline is None else deadline - time.monotonic())
        return future.result()

    def poll(self, timeout_s: float = 0.0) -> None:
        """Waits up to `timeout_s` for replies and refreshes, handles what came (resolving futures,
        calling refresh callbacks), then fails or resends the requests whose time is up."""
        events = dict(self._poller.poll(max(0, math.ceil(timeout_s * 1e3))))
        if self.core.monitor in events:
            self.core.read_monitor()
        if self.core.socket in events:
            self.core.read_replies()
        for sub, listener in self._listeners:
            if sub in events:
                _drain_refreshes(sub, listener)
        if self.core.expire():
            self._poller = self._register()

    def listen_refreshes(self, pub_endpoint: str, callback: Callable[[dict[str, Any]], None]) -> RefreshListener:
        """Subscribes to this robot's refreshes. `callback(message)` runs inside this client's calls
        (`poll`, `wait` and the blocking requests): a caller that only waits for refreshes calls `poll`."""
        listener = RefreshListener(pub_endpoint, self.robot_id, callback, self.core.context, self.core.keys)
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
