"""`AsyncPolicyClient`: `PolicyClient`'s requests for asyncio code (the server's WebSocket gateways
use one per connection, `bench.fleet` one per simulated robot; robots use the blocking client).

The same core and the same methods (`transport.zmq_client_core`): `send` and `start_infer` return
an asyncio future, and `request`, `infer`, `subtask`, `set_refresh`, `ping` and `bye` send at once
and return a coroutine of what the blocking client's return (await it, or make it a task). The
driver is a `SocketReader` per socket on the running loop (pyzmq's asyncio sockets add about a
millisecond per round trip) and one timer at the core's next deadline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

from transport.refresh_listener import RefreshListener
from transport.zmq_client_core import ClientRequests
from transport.zmq_reader import SocketReader


class AsyncPolicyClient(ClientRequests[asyncio.Future, Coroutine[Any, Any, dict[str, Any]]]):
    """Requests to the policy server's ROUTER from one robot, from one event loop; the settings
    are `ClientRequests`'. The sockets are opened here and read once the client is first used on a
    running loop (`connect`, `async with`, or the first request)."""

    def __init__(self, endpoint: str, robot_id: str, **settings: Any):
        super().__init__(endpoint, robot_id, **settings)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._readers: list[SocketReader] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0  # when the timer fires, on the core's clock
        self._listeners: list[asyncio.Task] = []

    async def __aenter__(self) -> AsyncPolicyClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def connect(self) -> None:
        """Starts reading the sockets on the running loop (the first request does it otherwise)."""
        self._attach()

    def _attach(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._read()
        return self._loop

    def _read(self) -> None:
        """Readers on the core's current sockets (after a reset, the new ones)."""
        assert self._loop is not None
        for reader in self._readers:
            reader.close()
        self._readers = [SocketReader(self._loop, self.core.socket, self.core.handle_reply)]
        if self.core.monitor is not None:
            self._readers.append(SocketReader(self._loop, self.core.monitor, self._on_monitor_event))

    def _on_monitor_event(self, frames: list) -> None:
        self.core.handle_monitor_event([f.bytes for f in frames])
        self._arm()  # a disconnection brings the unreachable deadlines

    async def close(self) -> None:
        """Closes the sockets and stops listening; requests still waiting are cancelled. Closing
        again does nothing."""
        for reader in self._readers:
            reader.close()
        self._readers.clear()
        if self._timer is not None:
            self._timer.cancel()
        self.core.close()
        for task in self._listeners:
            task.cancel()
        await asyncio.gather(*self._listeners, return_exceptions=True)
        self._listeners.clear()

    def _arm(self) -> None:
        """The timer at the core's next deadline, unless it is set no later (none while nothing waits)."""
        assert self._loop is not None
        deadline = self.core.next_deadline()
        if deadline is None or (self._timer is not None and self._timer_at <= deadline):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self._loop.call_later(deadline - time.monotonic(), self._expire)

    def _expire(self) -> None:
        self._timer = None
        if self.core.expire():
            self._read()
        self._arm()

    def _future(self) -> asyncio.Future:
        return self._attach().create_future()

    def _sent(self) -> None:
        self._readers[0].kick()  # a send may have consumed the descriptor's edge
        self._arm()

    def _result(self, future: asyncio.Future) -> Coroutine[Any, Any, dict[str, Any]]:
        return _reply(future)

    def listen_refreshes(self, pub_endpoint: str, callback: Callable[[dict[str, Any]], None]) -> RefreshListener:
        """Subscribes to this robot's refreshes: `callback(message)` runs on the loop until `close`."""
        listener = RefreshListener(pub_endpoint, self.robot_id, callback, self.core.context, self.core.keys)
        self._listeners.append(self._attach().create_task(listener.run()))
        return listener


async def _reply(future: asyncio.Future) -> dict[str, Any]:
    """A coroutine of a sent request's reply, so that a request method's value can be awaited or
    made a task like any coroutine's (the request is on its way already)."""
    return await future
