"""The documented JSON API over WebSocket (`shared/spec/json_api.md`).

Each connection is a session: its requests are answered in order, a batch request runs its
items concurrently (so the engine batches them), and `subtask_refresh` messages are pushed on the
connection that asked for them. Any request that cannot be served gets
`{"status": "error", "error": {"code", "message"}}` and the connection stays open.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from transport.errors import BadRequest, TransportError
from transport.messages import ACTIONS, INFER, Observation, Request, parse_options
from transport.ws_common import WsServer, WsSettings

log = logging.getLogger(__name__)

Reply = tuple[dict[str, Any], dict[str, np.ndarray]]
Handler = Callable[[str, Request], Awaitable[Reply]]

_REFRESH_FIELDS = ("type", "subtask", "subtask_tokens", "refresh_count", "timestamp")
_RESPONSE_FIELDS = ("subtask", "subtask_tokens", "state", "timing")
_OFFLOAD_BYTES = 64 * 1024  # parse larger messages off the event loop
MAX_BATCH = 64


def parse_image(name: str, value: Any) -> np.ndarray:
    """An HxWx3 nested list of ints 0..255 as a uint8 array, or a precise error."""
    try:
        arr = np.asarray(value)
    except ValueError:
        raise BadRequest(f"image {name!r} is a ragged list; expected H x W x 3") from None
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise BadRequest(f"image {name!r} must be H x W x 3 nested lists, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
        raise BadRequest(f"image {name!r} must hold integers 0..255, got {arr.dtype}")
    if arr.min() < 0 or arr.max() > 255:
        raise BadRequest(f"image {name!r} has values outside 0..255 ({arr.min()}..{arr.max()})")
    return arr.astype(np.uint8)


def parse_request(item: Any, key: str, where: str = "request") -> Request:
    if not isinstance(item, dict):
        raise BadRequest(f"{where} must be a JSON object, got {type(item).__name__}")
    fields = dict(item)
    images = fields.pop("images", None)
    state = fields.pop("state", None)
    try:
        options = parse_options(fields)
        if not options.high_level_prompt:
            raise BadRequest("high_level_prompt is required (a non-empty string)")
        if not isinstance(images, dict) or not images:
            raise BadRequest("images is required: an object of camera name -> H x W x 3 lists")
        arrays = {name: parse_image(name, value) for name, value in images.items()}
        if state is not None:
            if not isinstance(state, list) or not all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in state
            ):
                raise BadRequest("state must be a list of numbers")
            state = np.asarray(state, np.float32)
    except BadRequest as e:
        raise BadRequest(f"{where}: {e.message}" if where != "request" else e.message, e.code) from None
    return Request(INFER, None, key, options, Observation(arrays, state))


def response(data: dict[str, Any], arrays: dict[str, np.ndarray], total_ms: float) -> dict[str, Any]:
    out: dict[str, Any] = {"status": "success", ACTIONS: np.asarray(arrays[ACTIONS])[None].tolist()}
    out.update({k: data.get(k) for k in _RESPONSE_FIELDS})
    out["server_timing"] = {"total_ms": total_ms}
    out["subtask_refresh_enabled"] = data.get("subtask_refresh_enabled", False)
    out["subtask_refresh_interval"] = data.get("subtask_refresh_interval")
    return out


def error(code: str, message: str) -> dict[str, Any]:
    return {"status": "error", "error": {"code": code, "message": message}}


class JsonApiServer(WsServer):
    """`handler(session_key, request)` serves one request; `on_disconnect(key)` ends a session."""

    def __init__(self, settings: WsSettings, handler: Handler, on_disconnect: Callable[[str], None]):
        super().__init__(settings)
        self._handler = handler
        self._on_disconnect = on_disconnect
        self._connections: dict[str, ServerConnection] = {}
        self._ids = itertools.count(1)

    async def push(self, key: str, message: dict[str, Any]) -> None:
        """Sends a refresh message to the session's connection (the scheduler's publish)."""
        connection = self._connections.get(key)
        if connection is None:
            return
        with_fields = {k: message[k] for k in _REFRESH_FIELDS}
        try:
            await connection.send(json.dumps(with_fields))
        except ConnectionClosed:
            pass

    async def _connection(self, connection: ServerConnection) -> None:
        key = f"ws-{next(self._ids)}"
        self._connections[key] = connection
        try:
            async for message in connection:
                received = time.perf_counter()
                reply = await self._serve(key, message, received)
                await connection.send(json.dumps(reply))
        except ConnectionClosed:
            pass
        finally:
            del self._connections[key]
            self._on_disconnect(key)

    async def _serve(self, key: str, message: str | bytes, received: float) -> dict[str, Any]:
        if isinstance(message, bytes):
            return error("bad_request", "the JSON API takes text frames; got a binary frame")
        try:
            self.check_size(message)
        except TransportError as e:
            return error(e.code, e.message)
        try:
            if len(message) > _OFFLOAD_BYTES:
                payload = await asyncio.to_thread(json.loads, message)
            else:
                payload = json.loads(message)
        except json.JSONDecodeError as e:
            return error("invalid_json", f"the message is not valid JSON: {e}")
        try:
            if isinstance(payload, dict) and "batch" in payload:
                return await self._batch(key, payload, received)
            request = parse_request(payload, key)
            data, arrays = await self._handler(key, request)
            return response(data, arrays, (time.perf_counter() - received) * 1e3)
        except TransportError as e:
            return error(e.code, e.message)
        except ValueError as e:
            return error("bad_request", str(e))
        except Exception as e:
            log.exception("JSON request on %s failed", key)
            return error("internal", f"internal error: {type(e).__name__}: {e}")

    async def _batch(self, key: str, payload: dict[str, Any], received: float) -> dict[str, Any]:
        items = payload["batch"]
        if set(payload) != {"batch"}:
            raise BadRequest(f"a batch request holds only 'batch'; got also {sorted(set(payload) - {'batch'})}")
        if not isinstance(items, list) or not items:
            raise BadRequest("batch must be a non-empty list of requests")
        if len(items) > MAX_BATCH:
            raise BadRequest(f"batch has {len(items)} requests, more than {MAX_BATCH}")
        requests = [parse_request(item, key, f"batch[{i}]") for i, item in enumerate(items)]
        replies = await asyncio.gather(*(self._handler(key, r) for r in requests), return_exceptions=True)
        for i, reply in enumerate(replies):
            if isinstance(reply, BaseException):
                if isinstance(reply, TransportError):
                    raise type(reply)(f"batch[{i}]: {reply.message}", reply.code)
                if isinstance(reply, ValueError):
                    raise BadRequest(f"batch[{i}]: {reply}")
                raise reply
        total_ms = (time.perf_counter() - received) * 1e3
        return {"status": "success", "results": [response(d, a, total_ms) for d, a in replies]}
