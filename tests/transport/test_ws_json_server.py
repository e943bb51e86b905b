"""The JSON API server in this process on 127.0.0.1 with a stub handler: what a gateway serving the
fixed backend cannot be made to do, such as a reply that holds NaN or infinity."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from websockets.asyncio.client import connect

from transport.ws_common import WsSettings
from transport.ws_json_server import JsonApiServer

REQUEST = {"images": {"base_0_rgb": [[[0, 0, 0]]]}, "high_level_prompt": "go"}


async def _nothing(key: str) -> None:
    pass


def _strict(text: str) -> dict:
    """JSON as the standard has it: Python's json.loads would read `NaN` and `Infinity` too."""

    def refuse(name: str) -> None:
        raise AssertionError(f"the reply is not JSON: it holds {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_reply_holding_nan_or_infinity_is_an_internal_error_and_the_connection_stays(bad):
    # Python's json writes NaN and Infinity, which no JSON parser reads: the client would get an
    # invalid frame. It gets a typed error for that request instead.
    async def handler(key, request):
        actions = np.zeros((4, 2), np.float32)
        if request.prompt == "bad":
            actions[1, 1] = bad
        return {"timing": {}, "actions": actions}

    async def scenario():
        server = JsonApiServer(WsSettings(port=0), handler, lambda: "k", _nothing)
        await server.start()
        try:
            async with connect(f"ws://127.0.0.1:{server.port}") as ws:
                replies = []
                for message in (
                    {**REQUEST, "high_level_prompt": "bad"},
                    {"batch": [REQUEST, {**REQUEST, "high_level_prompt": "bad"}]},
                    REQUEST,
                ):
                    await ws.send(json.dumps(message))
                    replies.append(_strict(await ws.recv()))
                return replies
        finally:
            await server.close()

    single, batch, after = asyncio.run(scenario())
    for reply in (single, batch):
        assert reply["status"] == "error" and reply["error"]["code"] == "internal", reply
        assert "NaN or infinity" in reply["error"]["message"]
    assert after["status"] == "success" and np.asarray(after["actions"]).shape == (1, 4, 2)
