"""An asyncio client for the JSON WebSocket API, and a command-line test of a server.

Requests on a connection are answered in order, so replies are matched first-in first-out; refresh
pushes are told apart by their `type` and go to the refresh callbacks. A dropped connection is
reopened with exponential backoff, and a request that was in flight is sent again (up to
`retries` times); each request has a timeout. The newest round-trip times are kept for statistics.

    python -m transport.ws_client --url ws://127.0.0.1:8765 --image base_0_rgb=front.png \
        --image left_wrist_0_rgb=wrist.npy --prompt "pick up the pen" --repeat 10 --refresh 1

prints each reply's subtask and action shape, each refresh as it arrives, and the client's round
trip next to the server's `server_timing` and the engine's `timing`. A server started with
`--token-file` wants `--token-file FILE` (or `--token`, visible to other users of this host in its
process list); one with TLS a `wss://` URL (`--ca-file` for a certificate no system CA signed).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import logging
import ssl
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from transport.errors import RemoteError, RequestTimeout
from transport.messages import ACTIONS, MODEL_ACTIONS, PREV_ACTIONS
from transport.ws_common import read_token

log = logging.getLogger(__name__)

ImageLike = np.ndarray | str | Path
CAMERAS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
_KEPT_ROUND_TRIPS = 100_000


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
    if request.get(PREV_ACTIONS) is not None:  # real-time chunking's leftover, (n, action dim)
        request[PREV_ACTIONS] = np.asarray(request[PREV_ACTIONS], np.float64).tolist()
    return request


def _arrays(reply: dict[str, Any]) -> dict[str, Any]:
    """A reply with `actions` (and `model_actions` when asked) as float32 arrays."""
    for key in (ACTIONS, MODEL_ACTIONS):
        if key in reply:
            reply[key] = np.asarray(reply[key], np.float32)
    return reply


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
        token: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ):
        """`token` is sent as `Authorization: Bearer <token>`; `ssl_context` verifies a `wss://` server
        (default: the system's CAs)."""
        self.uri = uri
        self._headers = {"Authorization": f"Bearer {token}"} if token else None
        self._ssl = ssl_context
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
        self.round_trips_ms: collections.deque[float] = collections.deque(maxlen=_KEPT_ROUND_TRIPS)
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
                    self.uri,
                    max_size=self.max_message_bytes,
                    compression=None,
                    open_timeout=self.timeout_s,
                    additional_headers=self._headers,
                    **({"ssl": self._ssl} if self._ssl is not None else {}),
                )
                break
            except (OSError, InvalidHandshake, TimeoutError) as e:
                if isinstance(e, InvalidStatus) and e.response.status_code in (401, 403):
                    # Refused access (token, origin): trying again changes nothing.
                    raise ConnectionError(f"{self.uri} refused this client: {e}") from None
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
        """One request; `actions` comes back as a (1, horizon, action_dim) float array (and
        `model_actions`, with `return_model_actions=True`, as (1, horizon, model action dim)).
        Real-time chunking: `prev_actions` (an (n, action dim) array), `inference_delay`,
        `execute_horizon` and optionally `rtc_schedule`, `max_guidance_weight` (docs/protocol.md)."""
        return _arrays(await self.request(build_request(images, high_level_prompt, state, **options)))

    async def infer_batch(self, requests: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Several requests in one message (each made with `build_request`); results in order."""
        reply = await self.request({"batch": list(requests)})
        return [_arrays(r) for r in reply["results"]]

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


# ----------------------------------------------------------------------------- command line


def _camera_path(text: str) -> tuple[str, str]:
    camera, sep, path = text.partition("=")
    if not sep or not camera or not path:
        raise argparse.ArgumentTypeError(f"expected CAMERA=PATH, got {text!r}")
    return camera, path


def _numbers(text: str) -> list[float]:
    try:
        return [float(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m transport.ws_client",
        description="Send requests to a policy server's JSON WebSocket API and print what comes back.",
    )
    p.add_argument("--url", required=True, help="the server's JSON API, ws://HOST:PORT")
    p.add_argument(
        "--image",
        type=_camera_path,
        action="append",
        default=[],
        metavar="CAMERA=PATH",
        help=f"an image file (PNG, JPEG, ...) or .npy (HxWx3 uint8) for one camera ({', '.join(CAMERAS)}); repeat",
    )
    p.add_argument("--random-images", action="store_true", help="random noise for every camera instead of --image")
    p.add_argument("--prompt", default="pick up the block", help="the high-level prompt")
    p.add_argument("--state", type=_numbers, default=None, help="the robot state, numbers separated by commas")
    p.add_argument("--batch", type=int, default=1, help="requests per message (a batch request when more than 1)")
    p.add_argument("--repeat", type=int, default=1, help="messages sent, one after the other")
    p.add_argument("--refresh", type=float, default=None, metavar="SECONDS", help="ask for a refresh this often")
    p.add_argument(
        "--refreshes", type=int, default=None, metavar="N", help="with --refresh: stop after N (default: Ctrl-C)"
    )
    p.add_argument("--no-subtask", action="store_true", help="generate_subtask false")
    p.add_argument("--low-level-prompt", default=None)
    p.add_argument("--max-decoding-steps", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each reply")
    token = p.add_mutually_exclusive_group()
    token.add_argument("--token-file", default=None, help="a file holding the server's WebSocket token")
    token.add_argument("--token", default=None, help="the token itself (other users may see it: prefer --token-file)")
    p.add_argument("--ca-file", default=None, help="PEM certificate(s) to trust for a wss:// server")
    return p


def _images(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, np.ndarray]:
    if bool(args.image) == args.random_images:
        parser.error("give --image CAMERA=PATH (once per camera) or --random-images, not both or neither")
    if args.random_images:
        print(
            f"WARNING: --random-images: sending random noise as the images of {', '.join(CAMERAS)} (224x224); "
            "the subtask and actions that come back mean nothing",
            file=sys.stderr,
        )
        rng = np.random.default_rng(args.seed)
        return {camera: rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for camera in CAMERAS}
    images = {}
    for camera, path in args.image:
        try:
            images[camera] = load_image(path)
        except (OSError, ValueError, ImportError) as e:
            parser.error(f"--image {camera}={path}: {e}")
    return images


@dataclasses.dataclass
class _Report:
    """What came back, for the statistics at the end."""

    server_ms: list[float] = dataclasses.field(default_factory=list)
    timing_ms: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    refreshes: int = 0

    def add(self, result: dict[str, Any]) -> None:
        server = result.get("server_timing") or {}
        if "total_ms" in server:
            self.server_ms.append(float(server["total_ms"]))
        for key, value in (result.get("timing") or {}).items():
            self.timing_ms.setdefault(key, []).append(float(value))


def _describe(index: str, result: dict[str, Any], round_trip_ms: float) -> str:
    timing = result.get("timing") or {}
    phases = ", ".join(f"{k.removesuffix('_ms')} {v:.1f}" for k, v in timing.items() if k != "total_ms")
    return (
        f"reply {index}: subtask {result.get('subtask')!r} | actions {np.shape(result.get('actions'))} | "
        f"round trip {round_trip_ms:.1f} ms | server_timing {result.get('server_timing', {}).get('total_ms', 0):.1f} ms"
        f" | timing {timing.get('total_ms', 0):.1f} ms ({phases})"
    )


async def _run(args: argparse.Namespace, images: dict[str, np.ndarray], client: JsonApiClient, report: _Report) -> None:
    options: dict[str, Any] = {}
    for name in ("low_level_prompt", "max_decoding_steps", "temperature", "seed"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    if args.no_subtask:
        options["generate_subtask"] = False
    if args.refresh is not None:
        options["subtask_refresh_interval"] = args.refresh
    request = build_request(images, args.prompt, args.state, **options)  # built once, sent `repeat` times
    enough = asyncio.Event()

    def on_refresh(message: dict[str, Any]) -> None:
        report.refreshes += 1
        print(f"refresh {message.get('refresh_count')}: subtask {message.get('subtask')!r}", flush=True)
        if args.refreshes is not None and report.refreshes >= args.refreshes:
            enough.set()

    client.listen_for_refresh_messages(on_refresh)
    await client.connect()
    try:
        await _exchange(args, request, client, report, enough)
    finally:
        await client.close()


async def _exchange(
    args: argparse.Namespace, request: dict[str, Any], client: JsonApiClient, report: _Report, enough: asyncio.Event
) -> None:
    for i in range(args.repeat):
        if args.batch > 1:
            results = await client.infer_batch([request] * args.batch)
        else:
            results = [await client.request(request)]
        for j, result in enumerate(results):
            report.add(result)
            index = f"{i + 1}/{args.repeat}" + (f" [{j}]" if args.batch > 1 else "")
            print(_describe(index, result, client.round_trips_ms[-1]), flush=True)
    if args.refresh is not None and not enough.is_set():
        until = "Ctrl-C" if args.refreshes is None else f"{args.refreshes} refreshes"
        print(f"printing refreshes (every {args.refresh:g} s) until {until}", file=sys.stderr, flush=True)
        await enough.wait()


def _print_statistics(client: JsonApiClient, report: _Report) -> None:
    def line(name: str, values: Sequence[float]) -> str:
        if not values:
            return f"  {name:<22} -"
        v = np.asarray(values)
        return (
            f"  {name:<22} p50 {np.percentile(v, 50):9.2f} ms  p99 {np.percentile(v, 99):9.2f} ms  "
            f"mean {v.mean():9.2f} ms  (n={v.size})"
        )

    print("timing:")
    print(line("client round trip", list(client.round_trips_ms)))
    print(line("server_timing.total", report.server_ms))
    for key, values in report.timing_ms.items():
        print(line(f"timing.{key.removesuffix('_ms')}", values))
    if report.refreshes:
        print(f"refreshes received: {report.refreshes}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch < 1 or args.repeat < 1:
        parser.error("--batch and --repeat must be at least 1")
    images = _images(args, parser)
    try:
        token = read_token(args.token_file) if args.token_file else args.token
        context = ssl.create_default_context(cafile=args.ca_file) if args.ca_file else None
    except (ValueError, OSError, ssl.SSLError) as e:
        parser.error(str(e))
    client = JsonApiClient(args.url, timeout_s=args.timeout, token=token, ssl_context=context)
    report = _Report()
    code = 0
    try:
        asyncio.run(_run(args, images, client, report))
    except KeyboardInterrupt:
        pass
    except RemoteError as e:
        code = 1
        print(f"error: the server answered {e.code}: {e}", file=sys.stderr)
    except (ConnectionError, RequestTimeout, ValueError) as e:
        code = 1
        print(f"error: {e}", file=sys.stderr)
    _print_statistics(client, report)
    return code


if __name__ == "__main__":
    sys.exit(main())
