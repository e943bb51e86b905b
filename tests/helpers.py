"""Helpers shared by tests: free ports and a policy server on a thread, on them."""

from __future__ import annotations

from tests.support.server_thread import ServerThread
from tests.support.server_thread import free_local_ports as free_ports

__all__ = ["free_ports", "server_thread", "zmq_server_thread"]


def server_thread(backend, *extra: str, ports: list[int] | None = None, websockets: bool = True) -> ServerThread:
    """The policy server (its WebSocket gateway processes too, unless `websockets` is false) on
    free 127.0.0.1 ports or `ports` (router, pub, ws, openpi), serving `backend`; `extra` adds
    flags."""
    router, pub, ws, openpi = ports or free_ports(4)
    if not websockets:
        ws = openpi = 0
    argv = ["--router-port", str(router), "--pub-port", str(pub), "--ws-port", str(ws), "--openpi-port", str(openpi)]
    return ServerThread([*argv, *extra], backend=backend)


def zmq_server_thread(backend, *extra: str) -> ServerThread:
    """The policy server's ZMQ endpoints alone, serving `backend`."""
    return server_thread(backend, *extra, websockets=False)
