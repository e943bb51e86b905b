"""Helpers shared by tests: free ports, a server thread on them, and an engine with extra latency."""

from __future__ import annotations

import asyncio

from runtime.server_thread import ServerThread
from runtime.server_thread import free_local_ports as free_ports

__all__ = ["DelayedBackend", "free_ports", "zmq_server_thread"]


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
