"""A supervised WebSocket gateway process (`runtime.gateway`) of the policy server.

The parent binds the listening socket and the child inherits it, so the port is held (and a port
problem reported) before the model loads, and a gateway that dies is restarted on the same socket
without a client ever finding the port closed: connections wait in the listen backlog meanwhile.
After its `ready` line the child's stdout carries `connections N` whenever its count of open
WebSocket connections changes: the one metrics endpoint of the server reads it from here.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys

from runtime import child_process

log = logging.getLogger(__name__)

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 2.0


class GatewayProcess:
    def __init__(self, name: str, sock: socket.socket, argv: list[str]):
        self.name = name
        self._sock = sock
        self._argv = argv
        self._proc: asyncio.subprocess.Process | None = None
        self._watcher: asyncio.Task | None = None
        self._closing = False
        self.restarts = 0
        self.connections = 0  # open WebSocket connections, as the process last reported

    async def start(self) -> None:
        """Starts the process and returns once it serves; then watches it and restarts it if it dies."""
        await self._spawn()
        self._watcher = asyncio.create_task(self._watch(), name=f"gateway-{self.name}")

    async def _spawn(self) -> None:
        fd = self._sock.fileno()
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "runtime.gateway", *self._argv, "--fd", str(fd),
            pass_fds=(fd,), stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert self._proc.stdout is not None
        try:
            line = await asyncio.wait_for(self._proc.stdout.readline(), START_TIMEOUT_S)
        except TimeoutError:
            line = b""
        if line.strip() != b"ready":
            await child_process.stop(self._proc, STOP_TIMEOUT_S)
            raise RuntimeError(f"the {self.name} WebSocket gateway did not start (see its log above)")

    async def _read_reports(self) -> None:
        """Reads the process's `connections N` lines until it closes its stdout (it exited)."""
        assert self._proc is not None and self._proc.stdout is not None
        async for line in self._proc.stdout:
            word, _, count = line.decode(errors="replace").partition(" ")
            if word == "connections" and count.strip().isdigit():
                self.connections = int(count)
        self.connections = 0

    async def _watch(self) -> None:
        while not self._closing:
            assert self._proc is not None
            await self._read_reports()
            code = await self._proc.wait()
            if self._closing:
                return
            self.restarts += 1
            log.error("the %s WebSocket gateway exited with %s; restarting it", self.name, code)
            await asyncio.sleep(min(5.0, 0.2 * self.restarts))
            try:
                await self._spawn()
            except (RuntimeError, OSError) as e:
                log.error("%s", e)

    async def close(self) -> None:
        self._closing = True
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        await child_process.stop(self._proc, STOP_TIMEOUT_S)
