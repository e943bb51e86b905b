"""A WebSocket gateway process: the JSON API or openpi's protocol, in front of the ZMQ ROUTER.

`python -m runtime.gateway {json,openpi} --fd N --router ipc://... --pub ipc://...` is started by
the policy server, never by hand. Parsing JSON (which holds the GIL even on a thread), converting
nested-list images and encoding replies are CPU work that would stall every robot if it ran beside
the ROUTER; here it runs in its own process. Each WebSocket connection becomes one DEALER on the
server's internal ROUTER, as robot `@json/<n>` or `@openpi/<n>`: the server keeps its session, bounds
its requests in flight and publishes its refreshes, which this process subscribes to and pushes on
the connection. When the connection closes the gateway says `bye`, so the session ends with it.

The listening socket was bound by the parent (before the model loaded) and is inherited as `--fd`.
Access control comes as paths (`--token-file`, `--tls-cert`, `--tls-key`) and `--allow-origin`: the
token is read from its file here, never passed on a command line.
The process prints `ready` on stdout once it serves, and exits when its parent goes away.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import os
import socket
from typing import Any

import numpy as np

from policy.request import Observation, Options
from robots.adapters import ADAPTERS, Adapter, get_adapter
from runtime import child_process
from runtime.cli_args import LOG_FORMAT
from transport import logs
from transport.errors import BadRequest, RemoteError, TransportError
from transport.messages import (
    ACTIONS,
    BYE,
    INFER,
    KEEP,
    MODEL_ACTIONS,
    Request,
    check_prev_actions,
    parse_guidance,
)
from transport.openpi_msgpack import pop_guidance
from transport.openpi_server import OpenpiServer
from transport.ws_common import WsServer, WsSettings, read_token, tls_context
from transport.ws_json_server import JsonApiServer
from transport.zmq_async_client import AsyncPolicyClient

log = logging.getLogger(__name__)

# The longest pixel `json.dumps` writes, "[255, 255, 255], ", and msgpack's 3 bytes; the prompts, the
# state and the options need little beside.
JSON_BYTES_PER_PIXEL = 17
OPENPI_BYTES_PER_PIXEL = 3
ENVELOPE_BYTES = 64 * 1024
# The internal hop has no Lazy Pirate retries (the server is the parent); the engine's own
# deadline answers long before this.
INTERNAL_TIMEOUT_S = 60.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runtime.gateway", description=__doc__.splitlines()[0])
    p.add_argument("protocol", choices=("json", "openpi"))
    p.add_argument("--fd", type=int, required=True, help="listening socket inherited from the policy server")
    p.add_argument("--router", required=True, help="the server's internal ROUTER (ipc://...)")
    p.add_argument("--pub", required=True, help="the server's XPUB, internal endpoint (ipc://...)")
    p.add_argument("--openpi-layout", choices=sorted(ADAPTERS), default="droid")
    p.add_argument("--default-prompt", default=None)
    p.add_argument("--max-batch", type=int, default=8, help="most requests in one JSON batch")
    p.add_argument("--max-connections", type=int, default=64)
    p.add_argument("--max-connections-per-client", type=int, default=16)
    p.add_argument("--token-file", default=None, help="a client must send this file's token at the handshake")
    p.add_argument("--tls-cert", default=None, help="PEM certificate chain: serve wss:// (with --tls-key)")
    p.add_argument("--tls-key", default=None, help="the certificate's PEM private key")
    p.add_argument("--allow-origin", action="append", default=[], help="a browser Origin let in (repeatable)")
    p.add_argument("--log-level", default="INFO")
    LOG_FORMAT.add_to(p)
    return p


class Gateway:
    """The connections of one WebSocket server, each bridged to the ROUTER by its own DEALER."""

    def __init__(self, args: argparse.Namespace, model: dict[str, Any]):
        self.args = args
        self.model = model
        self._clients: dict[str, AsyncPolicyClient] = {}
        self._ids = itertools.count(1)
        self._prefix = f"@{args.protocol}/{os.getpid()}-"
        self.adapter = get_adapter(args.openpi_layout).for_model(model["action_dim"])
        self.server: WsServer = self._json_server() if args.protocol == "json" else self._openpi_server()

    def _settings(self) -> WsSettings:
        a = self.args
        return WsSettings(
            max_message_bytes=self.max_message_bytes(),
            max_connections=a.max_connections,
            max_connections_per_client=a.max_connections_per_client,
            token=read_token(a.token_file) if a.token_file else None,
            allowed_origins=tuple(a.allow_origin),
            tls=tls_context(a.tls_cert, a.tls_key) if a.tls_cert else None,
        )

    def max_message_bytes(self) -> int:
        """One request at its largest: every camera of the model at the largest declared resolution,
        each way. A JSON batch shares that bound rather than multiplying it, so that a JSON message
        (parsed into Python lists, about 13 bytes per character) and websockets' own copies of it
        (twice its length while it is received) stay a few hundred MB; batching full-resolution
        images takes several messages, which the engine batches as well."""
        resolutions = self.model["image_resolutions"]
        h, w = max(r[0] for r in resolutions), max(r[1] for r in resolutions)
        per_pixel = JSON_BYTES_PER_PIXEL if self.args.protocol == "json" else OPENPI_BYTES_PER_PIXEL
        return ENVELOPE_BYTES + len(self.model["image_keys"]) * h * w * per_pixel

    def _sock(self) -> socket.socket:
        return socket.socket(fileno=self.args.fd)

    def _json_server(self) -> JsonApiServer:
        return JsonApiServer(
            self._settings(), self._json_request, self._open, self._close,
            max_batch=self.args.max_batch, health=self.healthy, sock=self._sock(),
        )  # fmt: skip

    def _openpi_server(self) -> OpenpiServer:
        adapter = self.adapter
        metadata = {
            "server": "pi05-runtime",
            "config": self.model.get("config"),
            "layout": adapter.name,
            "action_horizon": self.model.get("action_horizon"),
            "action_dim": adapter.action_dim,
        }
        return OpenpiServer(
            self._settings(), self._openpi_request, metadata, self._open, self._close,
            health=self.healthy, sock=self._sock(),
        )  # fmt: skip

    async def healthy(self) -> bool:
        """`/healthz`: the policy server answers a ping and its engine is healthy."""
        client = AsyncPolicyClient(self.args.router, "@health", timeout_s=1.0, retries=0)
        try:
            pong = await client.ping()
            return bool(pong["server"]["healthy"])
        except (TransportError, KeyError, TypeError):
            return False
        finally:
            await client.close()

    def _open(self) -> str:
        """A new connection: its robot name, DEALER and refresh subscription."""
        key = f"{self._prefix}{next(self._ids)}"
        client = self._clients[key] = AsyncPolicyClient(self.args.router, key, timeout_s=INTERNAL_TIMEOUT_S, retries=0)
        client.listen_refreshes(self.args.pub, lambda message: self._push(key, message))
        self._report()
        return key

    def _report(self) -> None:
        """Tells the parent how many connections are open, as a `connections N` line on stdout
        (non-blocking: the parent's metrics read it, `runtime.gateway.supervisor`). A full pipe
        drops the line; the next change reports the count again."""
        with contextlib.suppress(BlockingIOError):
            os.write(1, f"connections {len(self._clients)}\n".encode())

    def _push(self, key: str, message: dict[str, Any]) -> None:
        if isinstance(self.server, JsonApiServer):
            task = asyncio.create_task(self.server.push(key, message))
            task.add_done_callback(_log_failure)

    async def _close(self, key: str) -> None:
        client = self._clients.pop(key, None)
        if client is None:
            return
        self._report()
        with contextlib.suppress(TransportError):
            await asyncio.wait_for(client.request(BYE), 5.0)
        await client.close()

    async def _json_request(self, key: str, request: Request) -> dict[str, Any]:
        client = self._clients[key]
        return await client.request(
            INFER, request.prompt, request.options, request.observation, request.refresh_interval,
            guidance=request.guidance, return_model_actions=request.return_model_actions,
        )  # fmt: skip

    async def _openpi_request(self, key: str, obs: dict[str, Any]) -> dict[str, Any]:
        adapter = self.adapter
        obs, rtc_options, prev_actions = pop_guidance(obs)
        guidance, return_model_actions = parse_guidance(rtc_options, self._robot_actions(adapter, prev_actions))
        try:
            inputs = adapter.to_model(obs)
        except ValueError:
            raise
        except Exception as e:  # whatever the wire held, the client gets bad_request, not internal
            raise ValueError(f"the observation does not fit the {adapter.name} layout ({type(e).__name__})") from None
        prompt = inputs.prompt or self.args.default_prompt
        if not prompt:
            raise ValueError("the observation has no 'prompt' and the server has no --default-prompt")
        data = await self._clients[key].request(
            INFER, prompt, Options(generate_subtask=False), Observation(inputs.images, inputs.state), KEEP,
            guidance=guidance, return_model_actions=return_model_actions,
        )  # fmt: skip
        timing = {"infer_ms": data["timing"]["total_ms"]}
        reply = {"actions": adapter.from_model(data[ACTIONS]), "policy_timing": timing}
        if MODEL_ACTIONS in data:
            reply[MODEL_ACTIONS] = np.asarray(data[MODEL_ACTIONS])
        return reply

    def _robot_actions(self, adapter: Adapter, prev_actions: np.ndarray | None) -> np.ndarray | None:
        """An openpi client's leftover (the layout's actions) in the engine's robot units: the
        layout's `from_model` inverted, then dims the layout does not carry (a model wider than
        the layout) as 0."""
        if prev_actions is None:
            return None
        prev = check_prev_actions(prev_actions)
        if prev.shape[1] != adapter.action_dim:
            raise BadRequest(
                f"prev_actions must be (n, {adapter.action_dim}) for the {adapter.name} layout, got {prev.shape}"
            )
        robot = adapter.actions_to_model(prev)
        width = self.model.get("action_dim") or robot.shape[1]
        return np.pad(robot, ((0, 0), (0, max(0, width - robot.shape[1]))))


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("push failed: %r", task.exception())


async def _watch_parent(parent: int) -> None:
    """Elsewhere than Linux, the parent is polled: the gateway ends when it is gone."""
    while os.getppid() == parent:
        await asyncio.sleep(0.5)
    log.warning("the policy server is gone; the gateway exits")


async def run(args: argparse.Namespace, parent: int) -> None:
    probe = AsyncPolicyClient(args.router, "@gateway", timeout_s=30.0, retries=0)
    try:
        model = (await probe.ping())["model"]
    finally:
        await probe.close()
    gateway = Gateway(args, model)
    await gateway.server.start()
    print("ready", flush=True)
    os.set_blocking(1, False)  # the connection reports must never stall the event loop
    await _watch_parent(parent)
    await gateway.server.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(
        args.log_level.upper(),
        "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
        args.log_format,
        f"{args.protocol} gateway",
    )
    parent = os.getppid()
    child_process.die_with_parent(parent)
    try:
        asyncio.run(run(args, parent))
    except KeyboardInterrupt:
        return 0
    except RemoteError as e:
        log.error("the policy server refused the gateway: %s", e)
        return 2
    except ValueError as e:  # a token file or TLS certificate that cannot be used
        log.error("%s", e)
        return 2
    return 0
