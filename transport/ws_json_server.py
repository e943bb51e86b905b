"""The documented JSON API over WebSocket (docs/protocol.md, "JSON API").

Each connection is a session: its requests are answered in order, a batch request runs its items
concurrently (so the engine batches them), and `subtask_refresh` messages are pushed on the
connection that asked for them. Any request that cannot be served gets
`{"status": "error", "error": {"code", "message"}}` and the connection stays open. Parsing big
messages is bounded in concurrency (`max_parsing`), so many clients sending large images at once
cannot make the process hold more than a few parsed messages at a time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from transport import json_wire
from transport.errors import BadRequest, TransportError
from transport.messages import Request
from transport.ws_common import Health, WsServer, WsSettings, always_healthy

log = logging.getLogger(__name__)

Reply = tuple[dict[str, Any], dict[str, np.ndarray]]
Handler = Callable[[str, Request], Awaitable[Reply]]
_OFFLOAD_BYTES = 64 * 1024  # parse larger messages off the event loop


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
        max_parsing: int = 2,
        health: Health = always_healthy,
        sock: socket.socket | None = None,
    ):
        super().__init__(settings, health, sock)
        self._handler = handler
        self._open = open
        self._close = close
        self.max_batch = max_batch
        self._parsing = asyncio.Semaphore(max_parsing)
        self._connections: dict[str, ServerConnection] = {}

    async def push(self, key: str, message: dict[str, Any]) -> None:
        """Sends a refresh message to the session's connection."""
        connection = self._connections.get(key)
        if connection is None:
            return
        try:
            await connection.send(json.dumps(json_wire.refresh_message(message)))
        except ConnectionClosed:
            pass

    async def _connection(self, connection: ServerConnection) -> None:
        key = self._open()
        self._connections[key] = connection
        try:
            async for message in connection:
                received = time.perf_counter()
                reply = await self._serve(key, message, received)
                await connection.send(await self._encode(reply))
        except ConnectionClosed:
            pass
        finally:
            del self._connections[key]
            await self._close(key)

    async def _encode(self, reply: dict[str, Any]) -> str:
        if "results" in reply or "actions" in reply:
            return await asyncio.to_thread(json.dumps, reply)
        return json.dumps(reply)

    async def _serve(self, key: str, message: str | bytes, received: float) -> dict[str, Any]:
        try:
            if isinstance(message, bytes):
                raise BadRequest("the JSON API takes text frames; got a binary frame")
            self.check_size(message)
            async with self._parsing:
                if len(message) > _OFFLOAD_BYTES:
                    payload = await asyncio.to_thread(json_wire.loads, message)
                else:
                    payload = json_wire.loads(message)
                batch = isinstance(payload, dict) and "batch" in payload
                if batch:
                    requests = json_wire.parse_batch(payload, key, self.max_batch)
                else:
                    requests = [json_wire.parse_request(payload, key)]
                del payload
            replies = await asyncio.gather(*(self._handler(key, r) for r in requests), return_exceptions=True)
            total_ms = (time.perf_counter() - received) * 1e3
            results = []
            for i, reply in enumerate(replies):
                if isinstance(reply, BaseException):
                    raise _item_error(reply, i if batch else None)
                results.append(json_wire.response(*reply, total_ms))
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
