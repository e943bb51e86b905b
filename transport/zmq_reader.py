"""Reading a plain ZMQ socket from an asyncio event loop, without pyzmq's asyncio futures.

pyzmq's `zmq.asyncio` sockets cost more per message than the rest of a request's handling, and
add a millisecond of wake-up latency on a busy loop; a reader on the socket's file descriptor that
drains every waiting message costs a few microseconds. Used by the server's ROUTER and XPUB and by
`AsyncPolicyClient`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import zmq


class SocketReader:
    """Calls `on_message(frames)` for every message a socket receives, from the event loop.

    A ZMQ socket's file descriptor is edge-triggered and also signals for sends: each wake-up
    drains what is waiting (a bounded number at a time, so one busy peer cannot hold the loop),
    and the owner calls `kick()` after sending, which may have consumed an edge."""

    BURST = 64

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: zmq.Socket, on_message: Callable[[list], None]):
        self._loop, self._sock, self._on_message = loop, sock, on_message
        self._fd = sock.getsockopt(zmq.FD)
        loop.add_reader(self._fd, self.drain)

    def drain(self) -> None:
        for _ in range(self.BURST):
            if not self._sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                return
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._on_message(frames)
        self._loop.call_soon(self.drain)  # more waiting: let other work run first

    def kick(self) -> None:
        if self._sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self._loop.call_soon(self.drain)

    def close(self) -> None:
        self._loop.remove_reader(self._fd)
