"""What the two WebSocket servers share: the health check, the connection cap, the keepalive
and size settings, and access control (token, TLS, browser origins).

Every bound is explicit, since a WebSocket library's defaults are generous: the message size
(sized by the gateway from the model's cameras and accepted resolution), the frames queued per
connection, and the number of connections, refused with HTTP 503 before the handshake.

Access is decided before the handshake completes, so a refused client never gets to send a frame:
with a token set, a request without `Authorization: Bearer <token>` (or, where the subclass allows
it, openpi-client's `Api-Key <token>`) gets HTTP 401; a request carrying an `Origin` header (a web
page in a browser: other clients send none) gets 403 unless that origin is allowed. `/healthz`
stays open. With a TLS context the port speaks `wss://` only.
"""

from __future__ import annotations

import dataclasses
import hmac
import socket
import ssl
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from pathlib import Path

from websockets.asyncio.server import Server, ServerConnection, serve

from transport.errors import TransportError

Health = Callable[[], Awaitable[bool]]

MIN_TOKEN_CHARS = 16


def read_token(path: str | Path) -> str:
    """The token in a file (surrounding whitespace ignored); ValueError, one line, for a file that
    cannot be read or holds no usable token. A token is passed as a file, never on a command line
    (which other users of the host can list)."""
    try:
        token = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the token file {path}: {getattr(e, 'strerror', None) or e}") from None
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"the token in {path} is shorter than {MIN_TOKEN_CHARS} characters: too easy to guess")
    if not (token.isascii() and token.isprintable()) or any(c.isspace() for c in token):
        raise ValueError(f"the token in {path} must be printable ASCII without spaces (it travels in an HTTP header)")
    return token


def tls_context(cert: str | Path, key: str | Path) -> ssl.SSLContext:
    """A server TLS context (TLS 1.2 at least) from a PEM certificate chain and its key; ValueError,
    one line, when they cannot be loaded."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"cannot load the TLS certificate {cert} with key {key}: {e}") from None
    return context


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
    token: str | None = None  # required at the handshake when set
    allowed_origins: tuple[str, ...] = ()  # browser origins let in (clients sending no Origin always are)
    tls: ssl.SSLContext | None = None


async def always_healthy() -> bool:
    return True


class WsServer:
    """A WebSocket server with the shared settings; subclasses handle one connection in `_connection`.

    `health()` answers `GET /healthz` (200 "OK" or 503); `sock` is a listening socket bound by the
    parent process (the server binds every port before the model loads). `AUTH_SCHEMES` are the
    `Authorization` schemes that may carry the token."""

    AUTH_SCHEMES: tuple[str, ...] = ("bearer",)

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
        if self.settings.token is not None and not self._authorized(request.headers.get_all("Authorization")):
            response = connection.respond(
                HTTPStatus.UNAUTHORIZED, "this server needs a token: 'Authorization: Bearer <token>'\n"
            )
            response.headers["WWW-Authenticate"] = 'Bearer realm="pi05-runtime"'
            return response
        if self.connections >= self.settings.max_connections:
            return connection.respond(
                HTTPStatus.SERVICE_UNAVAILABLE, f"the server has {self.connections} connections, its limit\n"
            )
        return None

    def _authorized(self, values: list[str]) -> bool:
        """Exactly one `Authorization` header, an allowed scheme, the token (compared in constant time)."""
        if len(values) != 1 or self.settings.token is None:
            return False
        scheme, _, credentials = values[0].strip().partition(" ")
        if scheme.lower() not in self.AUTH_SCHEMES:
            return False
        return hmac.compare_digest(credentials.strip().encode(), self.settings.token.encode())

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
            # None admits clients that send no Origin (robots, scripts); browsers always send one.
            origins=[None, *s.allowed_origins],
            ssl=s.tls,
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
