"""Messages shaped to make a parser build millions of objects, at the gateway processes as the policy
server starts them (`--fixed-reply`, the default model's cameras and resolutions).

Before the pre-checks, 100 MB of `[{},{},...]` took the JSON gateway to 2.6 GB and stalled its other
clients 9 s, and 8 MB of empty msgpack maps took the openpi gateway from 44 MB to 1.2 GB, 8 s. Now
each is refused before anything is built: the gateway's peak resident memory (VmHWM, reset through
/proc/PID/clear_refs) rises by less than `MAX_RISE_MB`, the sender gets the protocol's error, and
another client of the same gateway is served meanwhile, no slower than `1 s + 10 x` the slowest
reply it had before the attack (a budget measured on this machine, so a busy machine moves it too).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import websockets.sync.client as ws_client
from websockets.exceptions import ConnectionClosed

from tests.support.server_process import ServerProcess
from transport import openpi_msgpack

MAX_RISE_MB = 200
MB = 1024 * 1024
VALID_JSON = json.dumps(
    {"images": {"base_0_rgb": np.zeros((8, 8, 3), int).tolist()}, "high_level_prompt": "go", "generate_subtask": False}
)
VALID_OPENPI = openpi_msgpack.packb(
    {
        "observation/exterior_image_1_left": np.zeros((8, 8, 3), np.uint8),
        "observation/wrist_image_left": np.zeros((8, 8, 3), np.uint8),
        "observation/joint_position": np.zeros(7),
        "observation/gripper_position": np.zeros(1),
        "prompt": "go",
    }
)


@pytest.fixture(scope="module")
def server():
    with ServerProcess("--fixed-reply") as s:
        yield s


def _gateway_pid(server: ServerProcess, protocol: str) -> int:
    for pid in server.children():
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"runtime.gateway" in argv and argv[argv.index(b"runtime.gateway") + 1] == protocol.encode():
            return pid
    raise AssertionError(f"no {protocol} gateway among {server.children()}")


def _memory_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} for {pid}")


class OtherClient(threading.Thread):
    """A well-behaved client of the same gateway, asking again and again: (start, end) of each reply."""

    def __init__(self, uri: str, protocol: str):
        super().__init__(daemon=True)
        self.uri, self.protocol = uri, protocol
        self.replies: list[tuple[float, float]] = []
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with ws_client.connect(self.uri, max_size=None, open_timeout=30) as ws:
                if self.protocol == "openpi":
                    ws.recv(timeout=30)
                while not self.stop.is_set():
                    start = time.perf_counter()
                    ws.send(VALID_JSON if self.protocol == "json" else VALID_OPENPI)
                    reply = ws.recv(timeout=60)
                    if self.protocol == "json":
                        assert json.loads(reply)["status"] == "success", reply
                    else:
                        assert isinstance(reply, bytes), reply
                    self.replies.append((start, time.perf_counter()))
                    time.sleep(0.01)
        except BaseException as e:
            self.error = e

    def slowest(self, since: float = 0.0) -> float:
        return max(end - start for start, end in self.replies if end >= since)


def _attack(server: ServerProcess, protocol: str, message: str | bytes) -> tuple[str | bytes | None, float, float]:
    """Sends `message` while another client is served: (the answer, or None for a close without one;
    the gateway's peak memory rise in MB; the other client's slowest reply while the attack ran,
    over its budget)."""
    pid = _gateway_pid(server, protocol)
    uri = server.ws if protocol == "json" else server.openpi
    other = OtherClient(uri, protocol)
    other.start()
    while len(other.replies) < 30 and other.is_alive():
        time.sleep(0.01)
    budget = 1.0 + 10 * other.slowest()
    base = _memory_mb(pid, "VmRSS")
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
    started = time.perf_counter()
    answer: str | bytes | None = None
    with ws_client.connect(uri, max_size=None, open_timeout=30, close_timeout=5) as ws:
        if protocol == "openpi":
            ws.recv(timeout=30)
        try:
            ws.send(message)
            answer = ws.recv(timeout=120)
            if protocol == "json":  # the connection stays open: a good request is served on it
                ws.send(VALID_JSON)
                assert json.loads(ws.recv(timeout=60))["status"] == "success"
        except (ConnectionClosed, OSError):  # closed while the message was still being sent
            pass
    served = len(other.replies)
    while len(other.replies) < served + 5 and other.is_alive():
        time.sleep(0.01)
    other.stop.set()
    other.join(60)
    assert other.error is None, f"the other client failed: {other.error!r}"
    return answer, _memory_mb(pid, "VmHWM") - base, other.slowest(since=started) / budget


def test_100_mb_of_empty_json_objects_are_refused_within_200_mb_and_others_are_served(server):
    answer, rise_mb, slowest = _attack(server, "json", "[" + "{}," * (100 * MB // 3) + "{}]")
    assert rise_mb < MAX_RISE_MB and slowest < 1.0, (rise_mb, slowest)
    assert answer is None  # more than twice the limit: closed (1009) without being read


def test_empty_json_objects_within_the_message_limit_are_counted_out_before_parsing(server):
    answer, rise_mb, slowest = _attack(server, "json", "[" + "{}," * (40 * MB // 3) + "{}]")
    assert rise_mb < MAX_RISE_MB and slowest < 1.0, (rise_mb, slowest)
    error = json.loads(answer)["error"]
    assert error["code"] == "bad_request" and "objects" in error["message"], error


@pytest.mark.parametrize(
    "message",
    [
        b"\xdd" + (8_000_000).to_bytes(4, "big") + b"\x80" * 8_000_000,
        msgpack.packb([[[[{}] * 15] * 15] * 15] * 2300),  # 7.8 M maps, no header counting more than 2300
    ],
    ids=["one array", "nested arrays"],
)
def test_8_mb_of_empty_msgpack_maps_are_refused_within_200_mb_and_others_are_served(server, message):
    answer, rise_mb, slowest = _attack(server, "openpi", message)
    assert rise_mb < MAX_RISE_MB and slowest < 1.0, (rise_mb, slowest)
    assert isinstance(answer, str) and answer.startswith("Error: bad_message:"), answer
