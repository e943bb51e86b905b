"""Servers and raw clients for the hostile-input and fault tests.

`ServerProcess` runs `python -m runtime.policy_server --fixed-reply` in its own process (as
deployed), so an input that crashes the server shows as a dead process instead of a dead test
run, and collects its log. `RawDealer` sends arbitrary frames to a ROUTER and waits for one reply
with a bounded timeout: the hostile tests build their own frames rather than using the robot's
client, which would refuse to send most of them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from runtime.server_thread import free_local_ports
from transport import codec

REPO = Path(__file__).resolve().parents[2]
READY_LINE = "INFO runtime.policy_server: ready"
START_TIMEOUT_S = 60.0
REPLY_TIMEOUT_S = 5.0


class ServerProcess:
    """The fixed-reply policy server as a child process on free ports (or the `ports` given)."""

    def __init__(self, *extra: str, ports: Sequence[int] | None = None, gateways: bool = True, env=None):
        self.ports = list(ports) if ports is not None else free_local_ports(4)
        router, pub, ws, openpi = self.ports
        if not gateways:
            ws = openpi = 0
            self.ports[2:] = [0, 0]
        self.argv = [
            sys.executable, "-m", "runtime.policy_server", "--fixed-reply",
            "--router-port", str(router), "--pub-port", str(pub),
            "--ws-port", str(ws), "--openpi-port", str(openpi), *extra,
        ]  # fmt: skip
        self._env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._ended = False
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0

    # ------------------------------------------------------------------ endpoints

    @property
    def router(self) -> str:
        return f"tcp://127.0.0.1:{self.ports[0]}"

    @property
    def pub(self) -> str:
        return f"tcp://127.0.0.1:{self.ports[1]}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.ports[2]}"

    @property
    def openpi(self) -> str:
        return f"ws://127.0.0.1:{self.ports[3]}"

    # ------------------------------------------------------------------ life

    def spawn(self) -> ServerProcess:
        with self._changed:
            self.lines, self._ended = [], False
            self.started_at = time.monotonic()
            self.proc = subprocess.Popen(
                self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self._env, cwd=REPO
            )
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()
        return self

    def start(self) -> ServerProcess:
        """Spawns the server and returns once it logged `ready`."""
        self.spawn()
        if not self.wait_for(lambda line: line.rstrip().endswith(READY_LINE), START_TIMEOUT_S):
            self.kill()
            raise AssertionError("the server never logged 'ready':\n" + self.log)
        return self

    def _read(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            with self._changed:
                if proc is self.proc:  # not a previous run's late output
                    self.lines.append(line)
                    self._changed.notify_all()
        with self._changed:
            if proc is self.proc:
                self._ended = True
                self._changed.notify_all()

    def wait_for(self, predicate: Callable[[str], bool], timeout_s: float, start: int = 0) -> bool:
        """Whether a log line from index `start` on satisfies `predicate` within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        seen = start
        with self._changed:
            while True:
                if any(predicate(line) for line in self.lines[seen:]):
                    return True
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if self._ended or left <= 0:
                    return False
                self._changed.wait(min(left, 0.2))

    @property
    def log(self) -> str:
        with self._changed:
            return "".join(self.lines)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def children(self) -> list[int]:
        """Pids of the server's child processes (its WebSocket gateways)."""
        assert self.proc is not None
        try:
            with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
                return [int(p) for p in f.read().split()]
        except FileNotFoundError:
            return []

    def stop(self, sig: int = signal.SIGINT, timeout_s: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


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
