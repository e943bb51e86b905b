"""A raw ZMQ client for the hostile-input and fault tests, and the well-formed requests it sends.

`RawDealer` sends arbitrary frames to a server's ROUTER (usually a `ServerProcess` with
`--fixed-reply`, so a crash shows as a dead process) and waits for one reply with a bounded timeout:
the hostile tests build their own frames rather than using the robot's client, which would refuse
to send most of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import zmq

from transport import codec

REPLY_TIMEOUT_S = 5.0


class RawDealer:
    """A DEALER that sends any frames and waits a bounded time for one reply."""

    def __init__(self, endpoint: str, context: zmq.Context | None = None, identity: bytes | None = None):
        self._ctx = context or zmq.Context.instance()
        self.socket = self._ctx.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        if identity is not None:
            self.socket.setsockopt(zmq.ROUTING_ID, identity)
        self.socket.connect(endpoint)

    def send(self, frames: Sequence[Any]) -> None:
        self.socket.send_multipart(list(frames), copy=True)

    def receive(self, timeout_s: float = REPLY_TIMEOUT_S) -> list[bytes] | None:
        if not self.socket.poll(int(timeout_s * 1e3)):
            return None
        return self.socket.recv_multipart()

    def exchange(self, frames: Sequence[Any], timeout_s: float = REPLY_TIMEOUT_S) -> list[bytes] | None:
        self.send(frames)
        return self.receive(timeout_s)

    def request(self, header: dict[str, Any], arrays: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
        """A well-formed request; its decoded reply header (arrays under `_arrays`)."""
        frames = self.exchange(codec.encode(header, arrays))
        assert frames is not None, f"no reply to {header.get('type')} {header.get('id')} in {REPLY_TIMEOUT_S} s"
        reply, reply_arrays = codec.decode(frames)
        reply["_arrays"] = reply_arrays
        return reply

    def close(self) -> None:
        self.socket.close(linger=0)

    def __enter__(self) -> RawDealer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def image(h: int = 8, w: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def infer_header(request_id: int, robot: str = "probe", **options: Any) -> dict[str, Any]:
    return {
        "type": "infer",
        "id": request_id,
        "robot": robot,
        "ts": 0.5,
        "options": {"high_level_prompt": "pick up the cup", "generate_subtask": False, **options},
    }


def infer_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    return {"image/base_0_rgb": image(seed=seed), "state": np.linspace(-1, 1, 8, dtype=np.float32)}


def ping(endpoint: str) -> dict[str, Any]:
    """The `server` part of a ping, from a fresh peer."""
    with RawDealer(endpoint) as dealer:
        reply = dealer.request({"type": "ping", "id": 1})
    assert reply["type"] == "pong", reply
    return reply["data"]["server"]
