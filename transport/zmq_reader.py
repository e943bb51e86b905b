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

from transport.zmq_frames import NOBLOCK, readable, recv_frames


class SocketReader:
    """Calls `on_message(frames)` for every message a socket receives, from the event loop.

    A ZMQ socket's file descriptor is edge-triggered and also signals for sends: each wake-up
    drains what is waiting (a bounded number at a time, so one busy peer cannot hold the loop),
    and the owner calls `kick()` after sending, which may have consumed an edge. At most one drain
    waits in the loop's queue at a time: under a flood the descriptor wakes the loop again and again,
    and a drain queued for each wake-up would multiply, each running a burst in every turn of the
    loop (measured: 20 ms between turns). The socket is
    looked at once at the start too: libzmq signals a message only to a reader that has found its
    queue empty, so a socket whose queue was never looked at (a monitor's, say) would never wake it.

    Messages are read until there are none (`zmq.Again`), without asking `EVENTS` before each: every
    such look makes libzmq move what the socket's connections sent into the socket's own queue, and
    an XPUB's queue of subscriptions has no bound (a flood would be pulled in ahead of the reader)."""

    BURST = 64

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: zmq.Socket, on_message: Callable[[list], None]):
        self._loop, self._sock, self._on_message = loop, sock, on_message
        self._fd = sock.getsockopt(zmq.FD)
        self._closed = False
        self._queued: asyncio.Handle | None = None
        loop.add_reader(self._fd, self.drain)
        self.kick()

    def drain(self) -> None:
        if self._closed:  # a drain queued before `close()`
            return
        for _ in range(self.BURST):
            try:
                frames = recv_frames(self._sock, NOBLOCK)
            except zmq.Again:
                return
            self._on_message(frames)
        self._queue()  # more waiting: let other work run first

    def kick(self) -> None:
        if not self._closed and readable(self._sock):
            self._queue()

    def _queue(self) -> None:
        if self._queued is None:
            self._queued = self._loop.call_soon(self._drain_queued)

    def _drain_queued(self) -> None:
        self._queued = None
        self.drain()

    def close(self) -> None:
        self._closed = True
        if self._queued is not None:
            self._queued.cancel()
        self._loop.remove_reader(self._fd)
