"""openpi's WebSocket policy protocol, for `openpi-client` and the robots already using it.

On connect the server sends one binary frame: the msgpack metadata map. Then each binary frame in
is an observation dict (msgpack-numpy) and each frame out holds `actions` plus `policy_timing`
and `server_timing` (`infer_ms`, and from the second request on `prev_total_ms`). On an error
the server sends a text frame saying what went wrong and closes with 1011, as openpi does (the
client raises it as a `RuntimeError`); the traceback stays in the server's log. Unlike openpi,
inference never runs on the event loop, so many clients are served at once; nor does decoding a
large message, which runs on a worker thread, at most `max_parsing` at once, after
`openpi_msgpack`'s pre-scan has refused shapes that would build millions of objects.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

from transport import openpi_msgpack
from transport.errors import TransportError
from transport.ws_common import Health, WsServer, WsSettings, always_healthy

log = logging.getLogger(__name__)

Handler = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]


class OpenpiServer(WsServer):
    """`open()` names a new connection's session, `handler(key, observation)` answers one
    observation, `close(key)` ends the session. The token may also come as openpi-client's
    `Authorization: Api-Key <token>` (what its `api_key` argument sends)."""

    AUTH_SCHEMES = ("bearer", "api-key")

    def __init__(
        self,
        settings: WsSettings,
        handler: Handler,
        metadata: dict[str, Any],
        open: Callable[[], str],
        close: Callable[[str], Awaitable[None]],
        *,
        health: Health = always_healthy,
        sock: socket.socket | None = None,
    ):
        super().__init__(settings, health, sock)
        self._handler = handler
        self._metadata = metadata
        self._open = open
        self._close = close

    async def _connection(self, connection: ServerConnection) -> None:
        key = self._open()
        try:
            await self._serve(key, connection)
        finally:
            await self._close(key)

    async def _serve(self, key: str, connection: ServerConnection) -> None:
        prev_total_ms: float | None = None
        try:
            await connection.send(openpi_msgpack.packb(self._metadata))
            async for message in connection:
                start = time.perf_counter()
                try:
                    if isinstance(message, str):
                        raise TransportError(
                            "openpi observations are binary msgpack frames, got a text frame", "bad_request"
                        )
                    self.check_size(message)
                    obs = await self.parse(openpi_msgpack.unpackb, message)
                    if not isinstance(obs, dict):
                        raise TransportError(f"an observation must be a map, got {type(obs).__name__}", "bad_request")
                    infer_start = time.perf_counter()
                    result = await self._handler(key, obs)
                    infer_ms = (time.perf_counter() - infer_start) * 1e3
                except TransportError as e:
                    await self._fail(connection, f"{e.code}: {e.message}")
                    return
                except ValueError as e:
                    await self._fail(connection, f"bad_request: {e}")
                    return
                except Exception as e:
                    log.exception("openpi request failed")
                    await self._fail(connection, f"internal: {type(e).__name__}")
                    return
                result = dict(result)
                result.setdefault("policy_timing", {"infer_ms": infer_ms})
                result["server_timing"] = {"infer_ms": infer_ms}
                if prev_total_ms is not None:
                    result["server_timing"]["prev_total_ms"] = prev_total_ms
                await connection.send(openpi_msgpack.packb(result))
                prev_total_ms = (time.perf_counter() - start) * 1e3
        except ConnectionClosed:
            pass

    async def _fail(self, connection: ServerConnection, message: str) -> None:
        log.info("openpi client error: %r", message)
        try:
            await connection.send(f"Error: {message}")
            await connection.close(CloseCode.INTERNAL_ERROR, "Internal server error. Error included in previous frame.")
        except ConnectionClosed:
            pass
