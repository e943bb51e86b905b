"""Thousands of random, mutated and oversized ZMQ messages leave the server's memory flat.

The codec builds arrays as views over the received frames and the server answers each message from
them; a view kept past its reply (in a session, an error, a log) would keep its frames, 450 KB a
request here. Every message gets a typed error or a reply, and a well-formed request is served after.
"""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from tests.support.raw_dealer import RawDealer, infer_arrays, infer_header
from tests.support.server_process import ServerProcess
from transport import codec
from transport.messages import REPLY_TYPE

MESSAGES = 1500
MAX_GROWTH_MB = 40.0  # 1500 messages of up to 1 MB each would be 600 MB or more kept
CODES = frozenset(
    {"bad_message", "bad_header", "bad_version", "bad_frames", "bad_dtype", "unknown_type", "oversize", "bad_request"}
)


def _valid(request_id: int) -> list[bytes]:
    header = infer_header(request_id, robot=f"robot-{request_id % 4}")  # four sessions, replaced as they go
    return [bytes(f) for f in codec.encode(header, infer_arrays())]


def _mutated(rng: np.random.Generator, request_id: int) -> list[bytes]:
    frames = _valid(request_id)
    kind = rng.integers(7)
    if kind == 0:  # header bytes flipped
        head = bytearray(frames[0])
        for i in rng.integers(0, len(head), rng.integers(1, 8)):
            head[i] = int(rng.integers(256))
        frames[0] = bytes(head)
    elif kind == 1:  # an array frame cut short or grown
        i = int(rng.integers(1, len(frames)))
        frames[i] = frames[i][: int(rng.integers(len(frames[i])))] if rng.random() < 0.5 else frames[i] + b"\0" * 99
    elif kind == 2:  # frames dropped or repeated
        frames = frames[:-1] if rng.random() < 0.5 else [*frames, frames[-1]]
    elif kind == 3:  # random bytes, 1 to 5 frames of up to 1 MB
        frames = [rng.bytes(int(rng.integers(0, 1 << 20))) for _ in range(int(rng.integers(1, 6)))]
    elif kind == 4:  # a descriptor promising an 8 GB array
        huge = {"name": "state", "dtype": "<f4", "shape": [2**31 - 1]}
        frames = [msgpack.packb({**infer_header(request_id), "v": codec.PROTOCOL_VERSION, "arrays": [huge]})]
    elif kind == 5:  # well-formed frames of a nonsense request
        frames[0] = codec.encode({"type": "infer", "id": request_id, "robot": 7})[0]
    return frames  # kind 6: a valid request among the hostile ones


def _check(reply: list[bytes] | None) -> None:
    """A typed error, or a well-formed reply (a mutation may leave a request valid)."""
    assert reply is not None, "no reply"
    header, arrays = codec.decode(reply)
    if header["type"] == "error":
        assert header["error"]["code"] in CODES, header
    else:
        assert header["type"] == REPLY_TYPE["infer"], header
        assert arrays["actions"].ndim == 2


@pytest.fixture(scope="module")
def server():
    with ServerProcess("--fixed-reply", gateways=False) as s:
        yield s


def test_hostile_frames_leave_memory_flat_and_the_server_serving(server):
    rng = np.random.default_rng(0)
    with RawDealer(server.router) as dealer:
        for i in range(200):  # warm: allocator pools and sessions reach their steady size
            _check(dealer.exchange(_valid(i)))
        before = server.rss_mb()["server"]
        for i in range(1000, 1000 + MESSAGES):
            _check(dealer.exchange(_mutated(rng, i)))
        oversize = [b"\x80"] + [b"\0" * (1 << 20)] * 33  # past the 32 MiB limit
        header, _ = codec.decode(dealer.exchange(oversize))
        assert header["error"]["code"] == "oversize"
        grown = server.rss_mb()["server"] - before
        reply = dealer.request(infer_header(99, robot="after"), infer_arrays())
    assert reply["type"] == "result" and reply["id"] == 99
    assert grown < MAX_GROWTH_MB, f"the server grew by {grown:.0f} MB over {MESSAGES} hostile messages"
