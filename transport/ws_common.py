"""What the two WebSocket servers share: the health check and the keepalive and size settings."""

from __future__ import annotations

import dataclasses
from http import HTTPStatus

from websockets.asyncio.server import Server, ServerConnection, serve

from transport.errors import TransportError


@dataclasses.dataclass(frozen=True)
class WsSettings:
    host: str = "127.0.0.1"
    port: int = 8765
    # A JSON image is about 4 bytes per value: three 640x480 cameras are ~11 MB, a batch of 8 ~90 MB.
    max_message_bytes: int = 128 * 1024 * 1024
    max_queue: int = 16
    # The event loop never waits on the model, so pings are answered even during a long compile.
    ping_interval_s: float = 20.0
    ping_timeout_s: float = 60.0


def health_check(connection, request):
    """`GET /healthz` answers 200 "OK"; every other path goes on to the WebSocket handshake."""
    if request.path == "/healthz":
        return connection.respond(HTTPStatus.OK, "OK\n")
    return None


class WsServer:
    """A WebSocket server with the shared settings; subclasses handle one connection in `_connection`."""

    def __init__(self, settings: WsSettings):
        self.settings = settings
        self._server: Server | None = None
        self.port: int | None = None

    async def _connection(self, connection: ServerConnection) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        s = self.settings
        self._server = await serve(
            self._connection,
            s.host,
            s.port,
            process_request=health_check,
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
