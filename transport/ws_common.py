"""What the two WebSocket servers share: the health check, the connection cap, the timeouts, the
size settings, bounded parsing, and access control (token, TLS, browser origins).

Every bound is explicit, since a WebSocket library's defaults are generous: the message size
(sized by the gateway from the model's cameras and accepted resolution), the frames queued per
connection, the messages parsed at once, and the number of connections, refused with HTTP 503
before the handshake.

No connection can hold a place under the cap while its peer is gone, silent or not reading. A TCP
connection must finish the WebSocket handshake within `open_timeout_s` (until then it does not
count); an open connection must answer a ping within `ping_timeout_s` (a client that only listens
for refresh pushes answers them and stays); and a peer must read what it is sent: a write buffer
that stays above its high-water mark for `send_timeout_s`, or holds more than `max_unread_bytes`,
drops the connection (`_ReadingPeer`). websockets itself waits for the write buffer to drain without
a deadline, in `send`, in its keepalive ping and in its closing handshake alike, and answers every
ping with a pong whatever the buffer holds: a client that sent requests and never read the replies
held its connection forever (the keepalive's ping waited behind the replies, so its timeout never
started), and one that sent pings without reading grew the gateway by the size of the pongs.

Access is decided before the handshake completes, so a refused client never gets to send a frame:
with a token set, a request without `Authorization: Bearer <token>` (or, where the subclass allows
it, openpi-client's `Api-Key <token>`) gets HTTP 401; a request carrying an `Origin` header (a web
page in a browser: other clients send none) gets 403 unless that origin is allowed. `/healthz`
stays open. With a TLS context the port speaks `wss://` only.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import hmac
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from pathlib import Path
from typing import TypeVar

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.typing import Data

from transport.errors import TransportError

log = logging.getLogger(__name__)

Health = Callable[[], Awaitable[bool]]
T = TypeVar("T")

# A message longer than this is parsed on a worker thread, so the event loop goes on with pings,
# other connections' replies and refresh pushes (a C parser holds the GIL, so the work the parse
# may do is bounded by each protocol's cheap pre-checks, not by the thread).
OFFLOAD_BYTES = 64 * 1024

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
    # Connections from one client address: its requests in flight are bounded by its connections
    # (a connection's requests are served in order, a JSON batch at most `--max-batch`), so one host
    # cannot take every connection or the server's whole request cap.
    max_connections_per_client: int = 16
    max_parsing: int = 2  # messages parsed at once, all connections together
    open_timeout_s: float = 10.0  # from TCP accept to the end of the WebSocket handshake (TLS included)
    # The event loop never waits on the model, so pings are answered even during a long compile.
    ping_interval_s: float = 20.0
    ping_timeout_s: float = 20.0  # no pong by then: the connection is closed
    send_timeout_s: float = 20.0  # what the peer leaves unread this long drops the connection
    max_unread_bytes: int = 4 * 1024 * 1024  # more unread than this (pongs to a flood of pings) drops it
    close_timeout_s: float = 10.0  # the closing handshake; then the TCP connection is dropped
    token: str | None = None  # required at the handshake when set
    allowed_origins: tuple[str, ...] = ()  # browser origins let in (clients sending no Origin always are)
    tls: ssl.SSLContext | None = None


async def always_healthy() -> bool:
    return True


class _ReadingPeer(ServerConnection):
    """A connection that is dropped when its peer does not read: when the write buffer stays above
    its high-water mark (asyncio's `pause_writing`) for `send_timeout_s`, or when what the peer
    sends leaves more than `max_unread_bytes` unread (websockets answers each ping by itself)."""

    def __init__(self, *args, send_timeout_s: float, max_unread_bytes: int, **kwargs):
        super().__init__(*args, **kwargs)
        self._send_timeout_s = send_timeout_s
        self._max_unread_bytes = max_unread_bytes
        self._stalled: asyncio.TimerHandle | None = None

    def pause_writing(self) -> None:
        super().pause_writing()
        why = f"read nothing for {self._send_timeout_s} s"
        self._stalled = self.loop.call_later(self._send_timeout_s, self._drop, why)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._unstall()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        unread = self.transport.get_write_buffer_size()
        if unread > self._max_unread_bytes:
            self._drop(f"left {unread} bytes unread")

    def connection_lost(self, exc: Exception | None) -> None:
        self._unstall()
        super().connection_lost(exc)

    def _unstall(self) -> None:
        if self._stalled is not None:
            self._stalled.cancel()
            self._stalled = None

    def _drop(self, why: str) -> None:
        """Closes the TCP connection at once: blocked sends return, and recv raises ConnectionClosed."""
        log.warning("%r %s: connection dropped", self.remote_address, why)
        self.transport.abort()


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
        self._parsing = asyncio.Semaphore(settings.max_parsing)
        self.port: int | None = None
        self.connections = 0
        self._per_client: collections.Counter[str] = collections.Counter()

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
        if self._per_client[_client(connection)] >= self.settings.max_connections_per_client:
            return connection.respond(
                HTTPStatus.SERVICE_UNAVAILABLE,
                f"this address has {self.settings.max_connections_per_client} connections, its limit\n",
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
        client = _client(connection)
        self.connections += 1
        self._per_client[client] += 1
        try:
            await self._connection(connection)
        finally:
            self.connections -= 1
            self._per_client[client] -= 1
            if self._per_client[client] <= 0:
                del self._per_client[client]

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
            create_connection=functools.partial(
                _ReadingPeer, send_timeout_s=s.send_timeout_s, max_unread_bytes=s.max_unread_bytes
            ),
            open_timeout=s.open_timeout_s,
            ping_interval=s.ping_interval_s,
            ping_timeout=s.ping_timeout_s,
            close_timeout=s.close_timeout_s,
            compression=None,
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def parse(self, parser: Callable[[Data], T], message: Data) -> T:
        """`parser(message)`, at most `max_parsing` at once; a large message on a worker thread."""
        async with self._parsing:
            if len(message) > OFFLOAD_BYTES:
                return await asyncio.to_thread(parser, message)
            return parser(message)

    def check_size(self, message: str | bytes) -> None:
        if len(message) > self.settings.max_message_bytes:
            raise TransportError(
                f"message is {len(message)} bytes, more than the server's limit of {self.settings.max_message_bytes}",
                "oversize",
            )


def _client(connection: ServerConnection) -> str:
    """The address a connection comes from (its host, not its port)."""
    address = connection.remote_address
    return str(address[0]) if isinstance(address, tuple) and address else str(address)
