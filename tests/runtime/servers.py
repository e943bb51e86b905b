"""Servers and raw clients for the hostile-input and fault tests.

The servers run as `tests.support.server_process.ServerProcess` with `--fixed-reply`, each in its own
process (as deployed), so an input that crashes the server shows as a dead process instead of a
dead test run. `RawDealer` sends arbitrary frames to a ROUTER and waits for one reply
with a bounded timeout: the hostile tests build their own frames rather than using the robot's
client, which would refuse to send most of them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import zmq

from transport import codec

REPLY_TIMEOUT_S = 5.0


def wait_pids_gone(pids: Sequence[int], timeout_s: float) -> list[int]:
    """The pids among `pids` still running after up to `timeout_s` (zombies count as gone)."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = [p for p in pids if _running(p)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


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
