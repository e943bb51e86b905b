"""What the two WebSocket servers share: the health check, the connection cap and the keepalive
and size settings.

Every bound is explicit, since a WebSocket library's defaults are generous: the message size
(sized by the gateway from the model's cameras and accepted resolution), the frames queued per
connection, and the number of connections, refused with HTTP 503 before the handshake.
"""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Awaitable, Callable
from http import HTTPStatus

from websockets.asyncio.server import Server, ServerConnection, serve

from transport.errors import TransportError

Health = Callable[[], Awaitable[bool]]


@dataclasses.dataclass(frozen=True)
class WsSettings:
    host: str = "127.0.0.1"
    port: int = 8765
    max_message_bytes: int = 64 * 1024 * 1024
    max_queue: int = 2  # frames received but not yet handled, per connection
    max_connections: int = 64
    # The event loop never waits on the model, so pings are answered even during a long compile.
    ping_interval_s: float = 20.0
    ping_timeout_s: float = 60.0


async def always_healthy() -> bool:
    return True


class WsServer:
    """A WebSocket server with the shared settings; subclasses handle one connection in `_connection`.

    `health()` answers `GET /healthz` (200 "OK" or 503); `sock` is a listening socket bound by the
    parent process (the server binds every port before the model loads)."""

    def __init__(self, settings: WsSettings, health: Health = always_healthy, sock: socket.socket | None = None):
        self.settings = settings
        self._health = health
        self._sock = sock
        self._server: Server | None = None
        self.port: int | None = None
        self.connections = 0

    async def _process_request(self, connection, request):
        if request.path == "/healthz":
            if await self._health():
                return connection.respond(HTTPStatus.OK, "OK\n")
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "the policy server is not healthy\n")
        if self.connections >= self.settings.max_connections:
            return connection.respond(
                HTTPStatus.SERVICE_UNAVAILABLE, f"the server has {self.connections} connections, its limit\n"
            )
        return None

    async def _serve_connection(self, connection: ServerConnection) -> None:
        self.connections += 1
        try:
            await self._connection(connection)
        finally:
            self.connections -= 1

    async def _connection(self, connection: ServerConnection) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        s = self.settings
        where = {"sock": self._sock} if self._sock is not None else {"host": s.host, "port": s.port}
        self._server = await serve(
            self._serve_connection,
            **where,
            process_request=self._process_request,
            # Up to twice the limit is read so that an oversize message gets a typed error reply;
            # past that websockets closes the connection (1009) without reading it.
            max_size=2 * s.max_message_bytes,
            max_queue=s.max_queue,
            ping_interval=s.ping_interval_s,
            ping_timeout=s.ping_timeout_s,
            compression=None,
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def check_size(self, message: str | bytes) -> None:
        if len(message) > self.settings.max_message_bytes:
            raise TransportError(
                f"message is {len(message)} bytes, more than the server's limit of {self.settings.max_message_bytes}",
                "oversize",
            )
