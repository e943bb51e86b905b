"""A ZMQ request and its reply as they travel, for the client core (`transport.zmq_client_core`):
the endpoint form, a request's frames, a reply's data or error, the queue bound and the names of
handshake failures. Pure functions and constants, no sockets.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import zmq

from policy.request import ChunkGuidance, Observation, Options
from transport import codec
from transport.errors import ProtocolError, RemoteError, RequestTimeout, TransportError
from transport.messages import (
    ACTIONS,
    ERROR,
    INFER,
    KEEP,
    MODEL_ACTIONS,
    REFRESH_INTERVAL,
    REPLY_TYPE,
    guidance_to_wire,
    observation_arrays,
    options_to_wire,
)

QUEUE_LIMIT = 100
HANDSHAKE_FAILURES = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "the server refused this client's CURVE key (not on its allow-list)",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "the security handshake failed (a CURVE server needs --curve-key and "
    "--curve-server-key; a plain server needs neither)",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "the security handshake failed (is --curve-server-key the server's key?)",
}


class ServerUnreachable(RequestTimeout):
    """No connection to the server could be made (nothing listens there, or the host is unreachable)."""

    code = "unreachable"


def zmq_endpoint(address: str) -> str:
    """The ZeroMQ endpoint for `host:port` or `tcp://host:port` (other transports, e.g. `ipc://`,
    pass unchanged); raises ValueError saying what is expected."""
    scheme, sep, rest = address.partition("://")
    if sep and scheme != "tcp":
        return address
    host, colon, port = (rest if sep else address).rpartition(":")
    if not colon or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"expected host:port or tcp://host:port with a port in 1..65535, got {address!r}")
    return f"tcp://{host}:{int(port)}"


def encode_request(
    kind: str,
    request_id: int,
    robot_id: str,
    prompt: str | None,
    options: Options | None,
    observation: Observation | None,
    refresh_interval: Any,
    guidance: ChunkGuidance | None = None,
    return_model_actions: bool = False,
) -> list:
    header: dict[str, Any] = {"type": kind, "id": request_id, "robot": robot_id}
    rtc_options, rtc_arrays = guidance_to_wire(guidance, return_model_actions)
    wire = {**options_to_wire(prompt, options, refresh_interval), **rtc_options}
    if wire:
        header["options"] = wire
    arrays: dict[str, np.ndarray] = {}
    if observation is not None:
        header["ts"] = observation.timestamp
        arrays = observation_arrays(observation)
    return codec.encode(header, {**arrays, **rtc_arrays})


def reply_data(kind: str, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """The `data` of a reply to a `kind` request, with an infer's `actions` (and `model_actions`,
    when asked) among its fields; raises the error it carries."""
    if header.get("type") == ERROR:
        error = header.get("error")
        error = error if isinstance(error, dict) else {}
        raise RemoteError(str(error.get("message", "unknown error")), str(error.get("code", "internal")))
    if header.get("type") != REPLY_TYPE[kind]:
        raise ProtocolError(f"expected a {REPLY_TYPE[kind]!r} reply, got {header.get('type')!r}")
    data = header.get("data")
    data = data if isinstance(data, dict) else {}  # the header was just decoded: nobody else holds it
    if kind == INFER:
        data[ACTIONS] = arrays.get(ACTIONS)
        if MODEL_ACTIONS in arrays:
            data[MODEL_ACTIONS] = arrays[MODEL_ACTIONS]
    return data


def queue_full(endpoint: str) -> TransportError:
    return TransportError(f"{QUEUE_LIMIT} requests to {endpoint} are queued unanswered; not sending more", "busy")


def split_options(options: dict[str, Any]) -> tuple[Options, Any]:
    """Decoding options and the refresh interval (absent: `KEEP`) from keyword arguments."""
    interval = options.pop(REFRESH_INTERVAL, KEEP)
    return Options(**options), interval
