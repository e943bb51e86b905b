"""The TCP connections a bound ZMQ socket has accepted, by peer address, so that those of one address
can be closed: libzmq offers no call to drop one peer of a socket.

A subscriber's every subscription is recorded by libzmq until its connection ends (see
`transport.subscriptions`), so a peer that floods subscriptions must lose its connections. The socket's
monitor reports each accepted connection's file descriptor; `cut(address)` shuts down (never closes:
the descriptor stays libzmq's) the connections whose peer is that address, and libzmq then ends them
as if the peer had hung up, reporting their subscriptions gone. A descriptor is checked to still be a
socket connected to that address first, since between an event and the cut it may have been closed
and its number reused. Only TCP connections are tracked: an ipc peer is a local process of the
server's own user (the socket folder admits no one else).

Peer addresses are written as libzmq writes a message's `Peer-Address` for TCP: the numeric IP.
"""

from __future__ import annotations

import logging
import os
import socket

import zmq
from zmq.utils.monitor import parse_monitor_message

log = logging.getLogger(__name__)

EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED


class Connections:
    """Feed it the monitor socket's messages (`on_event`); `monitor` is that socket, made before the
    watched socket binds so that no accepted connection is missed."""

    def __init__(self, watched: zmq.Socket):
        self.monitor = watched.get_monitor_socket(EVENTS)
        self._watched = watched
        self._by_fd: dict[int, str] = {}
        self.cut_connections = 0

    def on_event(self, frames: list) -> None:
        event = parse_monitor_message([f.bytes if hasattr(f, "bytes") else f for f in frames])
        fd = int(event["value"])
        if event["event"] == zmq.EVENT_ACCEPTED:
            address = _peer_ip(fd)
            if address is not None:
                self._by_fd[fd] = address
        else:
            self._by_fd.pop(fd, None)

    def addresses(self) -> dict[str, int]:
        """Open connections per peer address."""
        counts: dict[str, int] = {}
        for address in self._by_fd.values():
            counts[address] = counts.get(address, 0) + 1
        return counts

    def cut(self, address: str) -> int:
        """Shuts down every tracked connection from `address`; returns how many."""
        done = 0
        for fd, known in list(self._by_fd.items()):
            if known != address:
                continue
            del self._by_fd[fd]
            if _shutdown_if_from(fd, address):
                done += 1
        self.cut_connections += done
        return done

    def close(self) -> None:
        self._watched.disable_monitor()
        self.monitor.close(linger=0)


def _peer_ip(fd: int) -> str | None:
    """The numeric peer IP of a connected TCP socket `fd` (libzmq's still: a duplicate is examined)."""
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            if sock.family not in (socket.AF_INET, socket.AF_INET6):
                return None
            return sock.getpeername()[0]
    except OSError:
        return None


def _shutdown_if_from(fd: int, address: str) -> bool:
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.getpeername()[0] != address:
                return False
            sock.shutdown(socket.SHUT_RDWR)
            return True
    except OSError:
        return False
