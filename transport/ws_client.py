"""An asyncio client for the JSON WebSocket API.

Requests on a connection are answered in order, so replies are matched first-in first-out; refresh
pushes are told apart by their `type` and go to the refresh callbacks. A dropped connection is
reopened with exponential backoff, and a request that was in flight is sent again (up to
`retries` times); each request has a timeout. Round-trip times are kept per request for statistics.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from transport.errors import RemoteError, RequestTimeout

log = logging.getLogger(__name__)

ImageLike = np.ndarray | str | Path


def load_image(image: ImageLike) -> np.ndarray:
    """An HxWx3 uint8 array from an array, a `.npy` file, or an image file (PNG, JPEG, ... via Pillow)."""
    if isinstance(image, np.ndarray):
        arr = image
    else:
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path}")
        if path.suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
        else:
            try:
                from PIL import Image
            except ImportError:
                raise ImportError("loading image files needs Pillow (pip install pillow); or pass arrays") from None
            with Image.open(path) as img:
                arr = np.asarray(img.convert("RGB"))
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"image must be H x W x 3 uint8, got {arr.dtype} {arr.shape}")
    return arr


def build_request(
    images: Mapping[str, ImageLike],
    high_level_prompt: str,
    state: Sequence[float] | np.ndarray | None = None,
    **options: Any,
) -> dict[str, Any]:
    request: dict[str, Any] = {
        "images": {name: load_image(img).tolist() for name, img in images.items()},
        "high_level_prompt": high_level_prompt,
    }
    if state is not None:
        request["state"] = [float(x) for x in np.asarray(state).ravel()]
    request.update(options)
    return request


class JsonApiClient:
    def __init__(
        self,
        uri: str,
        *,
        timeout_s: float = 30.0,
        retries: int = 3,
        backoff_s: float = 0.1,
        max_backoff_s: float = 5.0,
        max_message_bytes: int = 128 * 1024 * 1024,
    ):
        self.uri = uri
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_message_bytes = max_message_bytes
        self._connection: ClientConnection | None = None
        self._reader: asyncio.Task | None = None
        self._waiting: collections.deque[asyncio.Future] = collections.deque()
        self._refresh_callbacks: list[Callable[[dict[str, Any]], None]] = []
        self._lock = asyncio.Lock()
        self.round_trips_ms: list[float] = []
        self.reconnects = 0
        self._connected_before = False

    async def __aenter__(self) -> JsonApiClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def connect(self) -> None:
        """Opens the connection, retrying with exponential backoff while the server is unreachable."""
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                self._connection = await connect(
                    self.uri, max_size=self.max_message_bytes, compression=None, open_timeout=self.timeout_s
                )
                break
            except (OSError, InvalidHandshake, TimeoutError) as e:
                if attempt == self.retries:
                    raise ConnectionError(f"cannot connect to {self.uri}: {e}") from e
                log.info("connecting to %s failed (%s); retrying in %.2f s", self.uri, e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_backoff_s)
            except InvalidURI as e:
                raise ValueError(f"bad WebSocket URI {self.uri!r}: {e}") from None
        self.reconnects += self._connected_before
        self._connected_before = True
        self._reader = asyncio.create_task(self._read(self._connection))

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None
        if self._connection is not None:
            await self._connection.close()
            self._connection = None

    def listen_for_refresh_messages(self, callback: Callable[[dict[str, Any]], None]) -> None:
        """Calls `callback(message)` for every `subtask_refresh` pushed on this connection."""
        self._refresh_callbacks.append(callback)

    async def _read(self, connection: ClientConnection) -> None:
        try:
            async for raw in connection:
                message = json.loads(raw)
                if isinstance(message, dict) and message.get("type") == "subtask_refresh":
                    for callback in self._refresh_callbacks:
                        callback(message)
                elif self._waiting:
                    future = self._waiting.popleft()
                    if not future.done():
                        future.set_result(message)
        except ConnectionClosed:
            pass
        finally:
            while self._waiting:
                future = self._waiting.popleft()
                if not future.done():
                    future.set_exception(ConnectionError("the connection dropped before the reply"))

    async def _send(self, payload: str) -> dict[str, Any]:
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                async with self._lock:
                    if self._connection is None or self._reader is None or self._reader.done():
                        await self.close()
                        await self.connect()
                    future = asyncio.get_running_loop().create_future()
                    self._waiting.append(future)
                    await self._connection.send(payload)
                return await asyncio.wait_for(future, self.timeout_s)
            except (ConnectionError, ConnectionClosed) as e:
                if attempt == self.retries:
                    raise ConnectionError(f"request to {self.uri} failed after {attempt + 1} tries: {e}") from e
                log.info("connection to %s dropped (%s); reconnecting in %.2f s", self.uri, e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_backoff_s)
                await self.close()
            except TimeoutError:
                # The reply may still come: drop the connection so it cannot be mistaken for the next one's.
                await self.close()
                if attempt == self.retries:
                    raise RequestTimeout(f"no reply from {self.uri} within {self.timeout_s} s") from None
        raise AssertionError("unreachable")

    async def request(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Sends a request (single or `{"batch": [...]}`); raises `RemoteError` on an error reply."""
        start = time.perf_counter()
        reply = await self._send(json.dumps(payload))
        self.round_trips_ms.append((time.perf_counter() - start) * 1e3)
        if reply.get("status") == "error":
            error = reply.get("error") or {}
            raise RemoteError(error.get("message", "unknown error"), error.get("code", "internal"))
        return reply

    async def infer(
        self,
        images: Mapping[str, ImageLike],
        high_level_prompt: str,
        state: Sequence[float] | np.ndarray | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """One request; `actions` comes back as a (1, horizon, action_dim) float array."""
        reply = await self.request(build_request(images, high_level_prompt, state, **options))
        reply["actions"] = np.asarray(reply["actions"], np.float32)
        return reply

    async def infer_batch(self, requests: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Several requests in one message (each made with `build_request`); results in order."""
        reply = await self.request({"batch": list(requests)})
        results = reply["results"]
        for r in results:
            r["actions"] = np.asarray(r["actions"], np.float32)
        return results

    def timing_stats(self) -> dict[str, float]:
        """Client-side round trips so far: count, mean, p50, p99 (ms)."""
        if not self.round_trips_ms:
            return {"count": 0}
        ms = np.asarray(self.round_trips_ms)
        return {
            "count": len(ms),
            "mean_ms": float(ms.mean()),
            "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)),
        }
