"""Access control on both WebSocket ports, through the gateway processes on 127.0.0.1 with the
fixed backend: the token at the handshake (401 before any frame; `/healthz` open), openpi-client's
`api_key`, browser origins, and TLS with a certificate made here."""

from __future__ import annotations

import asyncio
import http.client
import secrets
import ssl
from pathlib import Path

import numpy as np
import pytest
from websockets.exceptions import InvalidMessage, InvalidStatus
from websockets.sync.client import connect

from robots.adapters import get_adapter
from runtime.policy_server.fixed_backend import FixedBackend
from tests.support.keys import self_signed_cert
from tests.support.server_process import ServerProcess
from tests.support.serving import server_thread
from transport import openpi_msgpack
from transport.ws_client import JsonApiClient, build_request

ALLOWED_ORIGIN = "https://lab.example"
IMAGE = np.zeros((8, 8, 3), np.uint8)


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("token") / "token"
    path.write_text(secrets.token_urlsafe(24) + "\n")
    return path


@pytest.fixture(scope="module")
def server(token_file):
    flags = ("--token-file", str(token_file), "--allow-origin", ALLOWED_ORIGIN)
    with server_thread(FixedBackend(), *flags) as srv:
        yield srv


def _status(uri: str, **kw) -> int:
    """The HTTP status of a WebSocket handshake (101: the connection opened)."""
    try:
        with connect(uri, open_timeout=60, proxy=None, **kw):
            return 101
    except InvalidStatus as e:
        return e.response.status_code


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_a_token_is_required_on_both_ports_and_healthz_stays_open(server, token_file):
    token = token_file.read_text().strip()
    for name in ("ws", "openpi"):
        uri = f"ws://127.0.0.1:{server.ports[name]}"
        assert _status(uri) == 401
        assert _status(uri, additional_headers=_bearer(token[:-1] + "x")) == 401
        assert _status(uri, additional_headers=_bearer(token + token)) == 401
        assert _status(uri, additional_headers={"Authorization": f"Basic {token}"}) == 401
        assert _status(uri, additional_headers=_bearer(token)) == 101
        health = http.client.HTTPConnection("127.0.0.1", server.ports[name], timeout=10)
        health.request("GET", "/healthz")
        assert health.getresponse().status == 200
        health.close()
    # `Api-Key` is openpi-client's way; the JSON API takes the standard scheme only.
    api_key = {"Authorization": f"Api-Key {token}"}
    assert _status(f"ws://127.0.0.1:{server.ports['ws']}", additional_headers=api_key) == 401


def test_json_api_client_with_the_token_is_served(server, token_file):
    async def scenario():
        uri = f"ws://127.0.0.1:{server.ports['ws']}"
        async with JsonApiClient(uri, token=token_file.read_text().strip(), retries=0) as client:
            return await client.request(build_request({"base_0_rgb": IMAGE}, "pick up the cup", generate_subtask=False))

    assert asyncio.run(scenario())["status"] == "success"


def test_a_wrong_token_fails_at_once_in_the_json_client(server):
    async def scenario():
        client = JsonApiClient(f"ws://127.0.0.1:{server.ports['ws']}", token="x" * 32, retries=5, backoff_s=30.0)
        await client.connect()

    with pytest.raises(ConnectionError, match="refused this client"):
        asyncio.run(scenario())


def test_openpi_client_with_api_key_is_served(server, token_file):
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    policy = WebsocketClientPolicy("127.0.0.1", server.ports["openpi"], api_key=token_file.read_text().strip())
    example = get_adapter("droid").example(np.random.default_rng(0))
    example["prompt"] = "pick up the cup"
    assert policy.infer(example)["actions"].shape[-1] == get_adapter("droid").action_dim
    with pytest.raises(InvalidStatus):
        WebsocketClientPolicy("127.0.0.1", server.ports["openpi"], api_key="x" * 32)


def test_browser_origins_are_refused_unless_allowed(server, token_file):
    auth = _bearer(token_file.read_text().strip())
    for name in ("ws", "openpi"):
        uri = f"ws://127.0.0.1:{server.ports[name]}"
        assert _status(uri, additional_headers=auth, origin="https://evil.example") == 403
        assert _status(uri, additional_headers=auth, origin="null") == 403
        assert _status(uri, additional_headers=auth, origin=ALLOWED_ORIGIN) == 101


def test_tls_serves_wss_only_and_the_token_stays_off_command_lines(tmp_path, token_file):
    cert, key = self_signed_cert(tmp_path)
    token = token_file.read_text().strip()
    trust = ssl.create_default_context(cafile=cert)
    flags = ("--fixed-reply", "--token-file", str(token_file), "--tls-cert", str(cert), "--tls-key", str(key))
    with ServerProcess(*flags) as srv:
        json_port, openpi_port = srv.ports[2], srv.ports[3]
        assert f"wss://127.0.0.1:{json_port}" in srv.log
        for pid in srv.children():
            assert token.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
        assert _status(f"wss://127.0.0.1:{openpi_port}", ssl=trust) == 401
        wss = f"wss://127.0.0.1:{openpi_port}"
        # A handshake bound for a shared CI machine: the defect this checks is a refusal, not slowness.
        with connect(wss, ssl=trust, additional_headers=_bearer(token), proxy=None, open_timeout=60) as ws:
            assert openpi_msgpack.unpackb(ws.recv(timeout=10))["server"] == "pi05-runtime"
        with pytest.raises(ssl.SSLCertVerificationError):
            connect(f"wss://127.0.0.1:{json_port}", additional_headers=_bearer(token), proxy=None)  # untrusted
        with pytest.raises(InvalidMessage):  # a plain ws:// client gets no HTTP answer from a TLS port
            connect(f"ws://127.0.0.1:{json_port}", additional_headers=_bearer(token), proxy=None, open_timeout=10)

        async def scenario():
            uri = f"wss://127.0.0.1:{json_port}"
            async with JsonApiClient(uri, token=token, ssl_context=trust, retries=0) as client:
                return await client.request(build_request({"base_0_rgb": IMAGE}, "pick up", generate_subtask=False))

        assert asyncio.run(scenario())["status"] == "success"
