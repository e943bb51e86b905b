"""Idle and half-open connections cannot hold a WebSocket server's connection cap.

Both servers run in this process on 127.0.0.1 with a cap of one connection and every timeout
shortened to a fraction of a second (`WsSettings`), and each test checks that the cap frees (a new
client is served) after a peer that is gone in one way or another: one that never finishes the
handshake, one that does not answer pings, one that sends requests and never reads the replies
(websockets' `send` and closing handshake wait for the write buffer to drain without a deadline:
that one held its place forever). A client that answers pings and only listens keeps its place.

Waits are bounded by `HANG_S`, which only catches a hang: nothing here is timed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import os
import socket
from collections.abc import AsyncIterator

import numpy as np
import pytest
from websockets.asyncio.client import connect

from transport import openpi_msgpack
from transport.openpi_server import OpenpiServer
from transport.ws_common import WsServer, WsSettings
from transport.ws_json_server import JsonApiServer

TIMEOUT_S = 0.3
HANG_S = 60.0
SETTINGS = WsSettings(
    port=0, max_connections=1, open_timeout_s=TIMEOUT_S, ping_interval_s=TIMEOUT_S, ping_timeout_s=TIMEOUT_S,
    send_timeout_s=TIMEOUT_S, close_timeout_s=TIMEOUT_S,
)  # fmt: skip
JSON_REQUEST = json.dumps({"images": {"base_0_rgb": [[[0, 0, 0]]]}, "high_level_prompt": "go"})
OPENPI_REQUEST = openpi_msgpack.packb({"image": np.zeros((2, 2, 3), np.uint8), "prompt": "go"})
BIG_ACTIONS = np.random.default_rng(0).standard_normal((2000, 8)).astype(np.float32)  # replies of 60+ KB


async def _nothing(key: str) -> None:
    pass


def _json_server(keys: list[str] | None = None, settings: WsSettings = SETTINGS) -> JsonApiServer:
    """Answers every request with a big chunk; the sessions' keys go to `keys`."""
    opened = [] if keys is None else keys

    def open() -> str:
        opened.append(f"k{len(opened)}")
        return opened[-1]

    async def handler(key, request):
        return {"timing": {}, "actions": BIG_ACTIONS}

    return JsonApiServer(settings, handler, open, _nothing)


def _openpi_server() -> OpenpiServer:
    async def handler(key, obs):
        return {"actions": BIG_ACTIONS}

    return OpenpiServer(SETTINGS, handler, {"server": "test"}, lambda: "k", _nothing)


@contextlib.asynccontextmanager
async def _running(server: WsServer) -> AsyncIterator[WsServer]:
    await server.start()
    try:
        yield server
    finally:
        async with asyncio.timeout(HANG_S):  # a connection stuck as before the fix would hang it
            await server.close()


async def _until(predicate) -> None:
    async with asyncio.timeout(HANG_S):
        while not predicate():
            await asyncio.sleep(0.02)


async def _served(server: WsServer) -> None:
    """A fresh client connects and gets a reply: the cap has room."""
    async with connect(f"ws://127.0.0.1:{server.port}", max_size=None, open_timeout=HANG_S) as ws:
        if isinstance(server, OpenpiServer):
            await ws.recv()
            await ws.send(OPENPI_REQUEST)
            assert isinstance(await ws.recv(), bytes)
        else:
            await ws.send(JSON_REQUEST)
            assert json.loads(await ws.recv())["status"] == "success"


def _raw(port: int, handshake: bool = True) -> socket.socket:
    """A TCP connection that, when `handshake`, sent a WebSocket upgrade request; it reads nothing."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills fast: the server must wait to write
    sock.connect(("127.0.0.1", port))
    if handshake:
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(
            f"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
    sock.setblocking(False)
    return sock


def _frame(payload: bytes, opcode: int) -> bytes:
    """A client frame (masked with the zero key, which leaves the payload as it is)."""
    if len(payload) < 126:
        return bytes([0x80 | opcode, 0x80 | len(payload)]) + b"\0\0\0\0" + payload
    return bytes([0x80 | opcode, 0x80 | 126]) + len(payload).to_bytes(2, "big") + b"\0\0\0\0" + payload


def _closed_by_server(sock: socket.socket) -> bool:
    """Whether the server ended the TCP connection (what it had sent is skipped)."""
    try:
        while chunk := sock.recv(1 << 16):
            del chunk
        return True
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


async def _send_until_dropped(server: WsServer, data: bytes, pause_s: float) -> None:
    """Sends `data` again and again on one raw connection, never reading, until the server drops it."""
    with _raw(server.port) as sock:
        await _until(lambda: server.connections == 1)
        async with asyncio.timeout(HANG_S):
            while server.connections:
                with contextlib.suppress(BlockingIOError, ConnectionError):
                    sock.send(data)
                await asyncio.sleep(pause_s)


@pytest.mark.parametrize("make", [_json_server, _openpi_server], ids=["json", "openpi"])
def test_a_client_that_sends_requests_and_never_reads_the_replies_loses_its_place(make):
    async def scenario():
        async with _running(make()) as server:
            request = JSON_REQUEST.encode() if isinstance(server, JsonApiServer) else OPENPI_REQUEST
            frame = _frame(request, 0x1 if isinstance(server, JsonApiServer) else 0x2)
            await _send_until_dropped(server, frame, 0.005)  # until the replies back up and the server gives up
            await _served(server)

    asyncio.run(scenario())


def test_a_client_that_floods_pings_and_never_reads_the_pongs_is_dropped():
    # websockets answers every ping by itself, whatever the write buffer holds: 450 MB of pings in
    # 15 s grew a server by 410 MB of pongs. Here the stall timeout is out of reach, so only the
    # bound on unread bytes can drop the connection.
    settings = dataclasses.replace(SETTINGS, send_timeout_s=10 * HANG_S, max_unread_bytes=256 * 1024)

    async def scenario():
        async with _running(_json_server(settings=settings)) as server:
            pings = _frame(b"p" * 125, 0x9) * 1000
            await _send_until_dropped(server, pings, 0.001)
            await _served(server)

    asyncio.run(scenario())


@pytest.mark.parametrize("make", [_json_server, _openpi_server], ids=["json", "openpi"])
def test_a_connection_that_never_finishes_its_handshake_is_closed_and_never_counted(make):
    async def scenario():
        async with _running(make()) as server:
            stalled = [_raw(server.port, handshake=False) for _ in range(3)]
            stalled[0].send(b"GET / HTTP/1.1\r\nHost: x\r\n")  # half a request, then nothing
            await _served(server)  # they do not count toward the cap of one
            await _until(lambda: all(_closed_by_server(s) for s in stalled))
            for s in stalled:
                s.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("make", [_json_server, _openpi_server], ids=["json", "openpi"])
def test_a_connection_that_does_not_answer_pings_is_closed(make):
    async def scenario():
        async with _running(make()) as server:
            sock = _raw(server.port)  # opens the connection, then never reads: no pong
            await _until(lambda: server.connections == 1)
            await _until(lambda: server.connections == 0)
            await _until(lambda: _closed_by_server(sock))
            sock.close()
            await _served(server)

    asyncio.run(scenario())


def test_a_json_client_that_only_listens_and_answers_pings_keeps_its_place():
    async def scenario():
        keys: list[str] = []
        async with _running(_json_server(keys)) as server:
            uri = f"ws://127.0.0.1:{server.port}"
            async with connect(uri, ping_interval=None, open_timeout=HANG_S) as listener:
                await _until(lambda: server.connections == 1)
                # Many pings' worth of silence from the client; its library answers the pings.
                for count in range(1, 11):
                    await asyncio.sleep(SETTINGS.ping_interval_s + SETTINGS.ping_timeout_s)
                    assert server.connections == 1
                    await server.push(keys[0], {"type": "subtask_refresh", "refresh_count": count})
                    assert json.loads(await listener.recv())["refresh_count"] == count
                await listener.send(JSON_REQUEST)
                assert json.loads(await listener.recv())["status"] == "success"

    asyncio.run(scenario())
