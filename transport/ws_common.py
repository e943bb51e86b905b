"""What the two WebSocket servers share: the health check and the keepalive and size settings."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
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


async def start_server(settings: WsSettings, handler: Callable[[ServerConnection], Awaitable[None]]) -> Server:
    """Binds a WebSocket server with the shared settings; `/healthz` is answered before the handshake."""
    return await serve(
        handler,
        settings.host,
        settings.port,
        process_request=health_check,
        # Up to twice the limit is read so that an oversize message gets a typed error reply; past
        # that websockets closes the connection (1009) without reading it.
        max_size=2 * settings.max_message_bytes,
        max_queue=settings.max_queue,
        ping_interval=settings.ping_interval_s,
        ping_timeout=settings.ping_timeout_s,
        compression=None,
    )


def check_size(message: str | bytes, settings: WsSettings) -> None:
    if len(message) > settings.max_message_bytes:
        raise TransportError(
            f"message is {len(message)} bytes, more than the server's limit of {settings.max_message_bytes}",
            "oversize",
        )
