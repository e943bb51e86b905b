"""openpi's server in this process on 127.0.0.1 with a stub handler: what a gateway serving the fixed
backend cannot be made to do, such as an error whose text carries what a peer sent."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from transport import openpi_msgpack
from transport.openpi_server import OpenpiServer
from transport.ws_common import WsSettings

FORGED = "2026-01-01 00:00:00,000 ERROR runtime.policy_server.main: the server is compromised"


async def _nothing(key: str) -> None:
    pass


def test_an_error_quoting_the_peer_cannot_forge_a_log_line(caplog):
    # The error text goes to the log and back to the client; a peer's newline or escape codes in it
    # must not start a line of their own in the server's log.
    async def handler(key, obs):
        raise ValueError(f"observation key {obs['prompt']} is unknown")  # quotes the peer verbatim

    async def scenario():
        server = OpenpiServer(WsSettings(port=0), handler, {"server": "test"}, lambda: "k", _nothing)
        await server.start()
        try:
            async with connect(f"ws://127.0.0.1:{server.port}") as ws:
                await ws.recv()
                await ws.send(openpi_msgpack.packb({"prompt": f"x\n{FORGED}\x1b[2J", "a": np.zeros(1)}))
                error = await ws.recv()
                try:
                    await ws.recv()
                except ConnectionClosed as e:
                    return error, e.rcvd.code
        finally:
            await server.close()

    with caplog.at_level(logging.INFO, logger="transport.openpi_server"):
        error, code = asyncio.run(scenario())
    assert error.startswith("Error: bad_request: observation key x\n") and code == 1011  # the client sees it all
    logged = [r.getMessage() for r in caplog.records if r.name == "transport.openpi_server"]
    assert logged and all("\n" not in line and "\x1b" not in line for line in logged), logged
