"""One hostile message to openpi's port and a judgement of the answer, for the hostile-input tests of
every openpi layout."""

from __future__ import annotations

import re

import numpy as np
import websockets.sync.client as ws_client
from openpi_client import msgpack_numpy as openpi_msgpack_numpy
from websockets.exceptions import ConnectionClosed

MAX_ERROR_MESSAGE_CHARS = 4096  # an error message says what is wrong; it never echoes the input back
REPLY_TIMEOUT_S = 5.0


def openpi_exchange(uri: str, message: bytes | str, reply_timeout_s: float = REPLY_TIMEOUT_S) -> str | None:
    """Sends one message on a fresh connection to the openpi port at `uri`; what is wrong with the
    answer (None: fine): a reply with the layout's actions, or an `Error: ...` text frame that is not
    `internal`, short, and followed by a close with 1011, as openpi does."""
    try:
        with ws_client.connect(uri, max_size=None, open_timeout=10, close_timeout=5) as connection:
            metadata = openpi_msgpack_numpy.unpackb(connection.recv(timeout=reply_timeout_s))
            if not isinstance(metadata, dict):
                return f"metadata is not a map: {metadata!r:.200}"
            connection.send(message)
            reply = connection.recv(timeout=reply_timeout_s)
            if isinstance(reply, bytes):
                out = openpi_msgpack_numpy.unpackb(reply)
                actions = out.get("actions") if isinstance(out, dict) else None
                dim = metadata["action_dim"]
                if not isinstance(actions, np.ndarray) or actions.ndim != 2 or actions.shape[1] != dim:
                    return f"a reply without (horizon, {metadata['action_dim']}) actions: {out!r:.300}"
                return None
            if not reply.startswith("Error: "):
                return f"a text frame that is not an error: {reply[:300]!r}"
            if reply.startswith("Error: internal"):
                return f"an internal error for client input: {reply[:300]!r}"
            if len(reply) > MAX_ERROR_MESSAGE_CHARS or "\x7fELF" in reply:
                return f"an error text of {len(reply)} characters: {reply[:300]!r}"
            try:
                connection.recv(timeout=reply_timeout_s)
                return f"the connection stayed open after {reply[:200]!r}"
            except ConnectionClosed as e:
                code = e.rcvd.code if e.rcvd is not None else None
                if code != 1011:
                    return f"closed with {code} after {reply[:200]!r}, not 1011"
            return None
    except TimeoutError:
        return f"no answer within {reply_timeout_s} s"
    except ConnectionClosed as e:
        if past_twice_the_limit(e, message):
            return None
        return f"the connection closed without an error frame: {e}"
    except OSError as e:
        return f"cannot connect: {e}"


def past_twice_the_limit(e: ConnectionClosed, message: bytes | str) -> bool:
    """The documented answer to a message of more than twice the server's limit: websockets closes
    with 1009 without reading it (docs/protocol.md); its reason names the bytes it reads."""
    if e.rcvd is None or e.rcvd.code != 1009:
        return False
    match = re.search(r"exceeds limit of (\d+) bytes", e.rcvd.reason)
    return match is not None and len(message) > int(match.group(1))
