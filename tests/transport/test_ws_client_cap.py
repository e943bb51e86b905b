"""One client address holds at most its share of a WebSocket server's connections.

Its requests in flight are bounded by its connections (a connection's requests are answered in
order), so without this cap one host could take every connection, and through them the policy
server's whole request cap, from the others. A second loopback address (127.0.0.2, the source of a
client socket; the server listens on 127.0.0.1) stands for another host.
"""

from __future__ import annotations

import asyncio
import socket

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from transport.ws_common import WsSettings
from transport.ws_json_server import JsonApiServer


async def _nothing(key: str) -> None:
    pass


def _server() -> JsonApiServer:
    keys = iter(range(1_000_000))

    async def handler(key, request):
        raise AssertionError("no request is sent")

    return JsonApiServer(
        WsSettings(port=0, max_connections=4, max_connections_per_client=2), handler, lambda: f"k{next(keys)}", _nothing
    )


def _from(host: str, port: int) -> socket.socket:
    sock = socket.socket()
    sock.bind((host, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def test_one_address_holds_at_most_its_share_of_the_connections():
    async def scenario():
        server = _server()
        await server.start()
        uri = f"ws://127.0.0.1:{server.port}"
        try:
            first = [await connect(uri, sock=_from("127.0.0.1", server.port)) for _ in range(2)]
            with pytest.raises(InvalidStatus) as refused:
                await connect(uri, sock=_from("127.0.0.1", server.port))
            assert refused.value.response.status_code == 503
            assert b"this address has 2 connections" in refused.value.response.body
            other = await connect(uri, sock=_from("127.0.0.2", server.port))  # another host is served
            await first[0].close()
            while server.connections > 2:  # the closed one has left the server
                await asyncio.sleep(0.01)
            again = await connect(uri, sock=_from("127.0.0.1", server.port))  # its place is free again
            for connection in (*first, other, again):
                await connection.close()
        finally:
            await server.close()

    asyncio.run(scenario())
