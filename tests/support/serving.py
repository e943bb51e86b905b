"""The policy server on a thread of the test process, on free ports, serving a backend the test
hands it (a fixed reply, a fake that counts or fails): for tests that drive a real server from
synchronous code and need to look inside the backend."""

from __future__ import annotations

from runtime.policy_server.service import InferenceBackend
from tests.support.ports import free_local_ports
from tests.support.server_thread import ServerThread


def server_thread(
    backend: InferenceBackend, *extra: str, ports: list[int] | None = None, websockets: bool = True
) -> ServerThread:
    """The policy server (its WebSocket gateway processes too, unless `websockets` is false) on
    free 127.0.0.1 ports or `ports` (router, pub, ws, openpi), serving `backend`; `extra` adds
    flags."""
    router, pub, ws, openpi = ports or free_local_ports(4)
    if not websockets:
        ws = openpi = 0
    argv = ["--router-port", str(router), "--pub-port", str(pub), "--ws-port", str(ws), "--openpi-port", str(openpi)]
    return ServerThread([*argv, *extra], backend=backend)


def zmq_server_thread(backend: InferenceBackend, *extra: str) -> ServerThread:
    """The policy server's ZMQ endpoints alone, serving `backend`."""
    return server_thread(backend, *extra, websockets=False)
