"""Helpers shared by tests: free ports, a server thread on them, and an engine with extra latency."""

from __future__ import annotations

import asyncio
import socket

from runtime.server_thread import ServerThread


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def zmq_server_thread(backend) -> ServerThread:
    """The policy server's ZMQ endpoints on free 127.0.0.1 ports, serving `backend`."""
    router, pub = free_ports(2)
    argv = ["--router-port", str(router), "--pub-port", str(pub), "--ws-port", "0", "--openpi-port", "0"]
    return ServerThread(argv, backend=backend)


class DelayedBackend:
    """The real engine behind an extra, known latency (the injected engine delay)."""

    def __init__(self, engine, delay_s: float):
        self.engine, self.delay_s = engine, delay_s

    async def infer(self, **kwargs):
        await asyncio.sleep(self.delay_s)
        return await self.engine.infer(**kwargs)

    async def generate_subtask(self, **kwargs):
        return await self.engine.generate_subtask(**kwargs)

    def info(self):
        return self.engine.info()
