"""The documented JSON API over WebSocket (docs/protocol.md, "JSON API").

Each connection is a session: its requests are answered in order, a batch request runs its items
concurrently (so the engine batches them), and `subtask_refresh` messages are pushed on the
connection that asked for them. Any request that cannot be served gets
`{"status": "error", "error": {"code", "message"}}` and the connection stays open. Parsing is
bounded: a message's objects, strings and lists are counted before it is parsed
(`json_wire.JsonLimits`), at most `max_parsing` messages are parsed at once and a large one on a
worker thread, so many clients sending large images at once cannot make the process hold more than
a few parsed messages at a time. A reply holding NaN or infinity, which JSON cannot carry, becomes
an `internal` error reply to that request.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.typing import Data

from transport import json_wire
from transport.errors import BadRequest, TransportError
from transport.messages import Request
from transport.ws_common import Health, WsServer, WsSettings, always_healthy

log = logging.getLogger(__name__)

# A handler answers a request with the reply's `data`, its `actions` among its fields.
Handler = Callable[[str, Request], Awaitable[dict[str, Any]]]


class JsonApiServer(WsServer):
    """`open()` names a new connection's session, `handler(key, request)` serves one request,
    `close(key)` ends the session."""

    def __init__(
        self,
        settings: WsSettings,
        handler: Handler,
        open: Callable[[], str],
        close: Callable[[str], Awaitable[None]],
        *,
        max_batch: int = 8,
        health: Health = always_healthy,
        sock: socket.socket | None = None,
    ):
        super().__init__(settings, health, sock)
        self._handler = handler
        self._open = open
        self._close = close
        self.max_batch = max_batch
        self._limits = json_wire.JsonLimits(max_batch)
        self._connections: dict[str, ServerConnection] = {}

    async def push(self, key: str, message: dict[str, Any]) -> None:
        """Sends a refresh message to the session's connection."""
        connection = self._connections.get(key)
        if connection is None:
            return
        try:
            await connection.send(json_wire.dumps(json_wire.refresh_message(message)))
        except ConnectionClosed:
            pass

    async def _connection(self, connection: ServerConnection) -> None:
        key = self._open()
        self._connections[key] = connection
        try:
            async for message in connection:
                received = time.perf_counter()
                reply = await self._serve(key, message, received)
                await connection.send(await self._encode(key, reply))
        except ConnectionClosed:
            pass
        finally:
            del self._connections[key]
            await self._close(key)

    async def _encode(self, key: str, reply: dict[str, Any]) -> str:
        try:
            if "results" in reply or "actions" in reply:
                return await asyncio.to_thread(json_wire.dumps, reply)
            return json_wire.dumps(reply)
        except ValueError:
            log.error("the reply to %s held NaN or infinity; it is answered as an internal error", key)
            return json_wire.dumps(json_wire.error("internal", "internal error: the reply held NaN or infinity"))

    def _parse(self, key: str, message: Data) -> tuple[list[Request], bool]:
        """The requests of one message, and whether it was a batch."""
        payload = json_wire.loads(message, limits=self._limits)
        if isinstance(payload, dict) and "batch" in payload:
            return json_wire.parse_batch(payload, key, self.max_batch), True
        return [json_wire.parse_request(payload, key)], False

    async def _serve(self, key: str, message: Data, received: float) -> dict[str, Any]:
        try:
            self.check_size(message)
            requests, batch = await self.parse(functools.partial(self._parse, key), message)
            replies = await asyncio.gather(*(self._handler(key, r) for r in requests), return_exceptions=True)
            total_ms = (time.perf_counter() - received) * 1e3
            results = []
            for i, reply in enumerate(replies):
                if isinstance(reply, BaseException):
                    raise _item_error(reply, i if batch else None)
                results.append(json_wire.response(reply, total_ms))
            return {"status": "success", "results": results} if batch else results[0]
        except TransportError as e:
            return json_wire.error(e.code, e.message)
        except ValueError as e:
            return json_wire.error("bad_request", str(e))
        except Exception as e:
            log.exception("JSON request on %s failed", key)
            return json_wire.error("internal", f"internal error: {type(e).__name__}")


def _item_error(e: BaseException, index: int | None) -> BaseException:
    where = "" if index is None else f"batch[{index}]: "
    if isinstance(e, TransportError):
        return type(e)(f"{where}{e.message}", e.code)
    if isinstance(e, ValueError):
        return BadRequest(f"{where}{e}")
    return e
