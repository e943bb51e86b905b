"""The policy server in a process of its own, as deployed: for benchmarks and tests.

Unlike `ServerThread` (the server on a thread of the caller), an input that crashes the server
shows here as a dead process, signals reach it as they reach a service, and its memory is its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from tests.support.ports import free_local_ports
from tests.support.server_thread import TEST_CONFIG

REPO = Path(__file__).resolve().parents[2]  # the repository root: `-m bench...` runs from there
START_TIMEOUT_S = 600.0
# The server logs `ready (<role>): ...` just before it writes its ready file; the line reaches this
# process through a pipe, so it may come a moment after the file.
READY_LINE = re.compile(r"\bready \(")
READY_LINE_TIMEOUT_S = 10.0


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise OSError(f"process {pid} has no VmRSS")


class ServerProcess:
    """The policy server as a child process on free 127.0.0.1 ports (or the `ports` given: router,
    pub, ws, openpi), as deployed; its log (the gateways' too) is collected line by line. It is
    ready when its `--ready-file` appears (`ready` then holds that JSON). Without `--config` in
    `extra` it runs `TEST_CONFIG`."""

    def __init__(
        self, *extra: str, ports: Sequence[int] | None = None, gateways: bool = True, env=None, repo: Path = REPO
    ):
        self.ports = list(ports) if ports is not None else free_local_ports(4)
        router, pub, ws, openpi = self.ports
        if not gateways:
            ws = openpi = 0
            self.ports[2:] = [0, 0]
        self.argv = [
            sys.executable, "-m", "runtime.policy_server",
            "--router-port", str(router), "--pub-port", str(pub),
            "--ws-port", str(ws), "--openpi-port", str(openpi),
            *([] if "--config" in extra else ["--config", TEST_CONFIG]), *extra,
        ]  # fmt: skip
        self._dir = tempfile.TemporaryDirectory(prefix="pi05-server-")  # removed with this object
        self.ready_file = Path(self._dir.name) / "ready.json"
        self.argv += ["--ready-file", str(self.ready_file)]
        self.ready: dict | None = None
        self._ready_line = 0
        self._env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self._repo = repo  # the checkout whose server runs (a benchmark's baseline: another revision's)
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
            self.lines, self._ended, self.ready = [], False, None
            self.started_at = time.monotonic()
            with contextlib.suppress(FileNotFoundError):
                self.ready_file.unlink()
            self.proc = subprocess.Popen(
                self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self._env, cwd=self._repo
            )
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()
        return self

    def start(self, timeout_s: float = START_TIMEOUT_S) -> ServerProcess:
        """Spawns the server and returns once it is ready."""
        self.spawn()
        if not self.wait_ready(timeout_s):
            self.kill()
            raise AssertionError("the server never wrote its ready file:\n" + self.log)
        return self

    def wait_ready(self, timeout_s: float) -> bool:
        """Whether the server wrote its ready file within `timeout_s` (False at once if it exited)."""
        deadline = time.monotonic() + timeout_s
        while not self.ready_file.exists():
            if time.monotonic() > deadline or (self.proc is not None and self.proc.poll() is not None):
                return False
            time.sleep(0.02)
        self.ready = json.loads(self.ready_file.read_text())
        # `log` then holds everything the server said before it was ready (its endpoints too).
        self.wait_for(READY_LINE.search, READY_LINE_TIMEOUT_S)
        with self._changed:
            self._ready_line = next(
                (i + 1 for i, line in enumerate(self.lines) if READY_LINE.search(line)), len(self.lines)
            )
        return True

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

    def complaints(self) -> list[str]:
        """The WARNING, ERROR and CRITICAL lines logged since `ready`."""
        with self._changed:
            lines = list(self.lines)
        after = self._ready_line if self.ready is not None else len(lines)
        levels = (" WARNING ", " ERROR ", " CRITICAL ")
        return [line.rstrip() for line in lines[after:] if any(level in line for level in levels)]

    def rss_mb(self) -> dict[str, float]:
        """Resident memory (VmRSS) of the server and of each gateway process, MB, by name."""
        assert self.proc is not None
        out = {"server": _rss_mb(self.proc.pid)}
        for pid in self.children():
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                out[f"{argv[argv.index(b'runtime.gateway') + 1].decode()} gateway"] = _rss_mb(pid)
            except (OSError, ValueError, IndexError):
                continue  # gone meanwhile, or not a gateway
        return out

    def stop(self, sig: int = signal.SIGINT, timeout_s: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.wait_for(lambda line: False, 5.0, start=len(self.lines))  # the log read to its end
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, exc_type, *exc) -> None:
        self.stop()
        if exc_type is not None:  # pytest shows what a failing test printed: the server's side of it
            print(f"--- the server's log ---\n{self.log}")


def broker_process(ports: Sequence[int], *flags: str, timeout_s: float = 60.0) -> ServerProcess:
    """`python -m runtime.broker` on `ports` (router, pub, workers' ROUTER, workers' XSUB), started and
    ready, with `ServerProcess`'s log collection and ready file."""
    proc = ServerProcess(ports=[*ports[:2], 0, 0])
    proc.argv = [
        sys.executable, "-m", "runtime.broker", "--router-port", str(ports[0]), "--pub-port", str(ports[1]),
        "--worker-port", str(ports[2]), "--worker-pub-port", str(ports[3]), "--ready-file", str(proc.ready_file),
        *flags,
    ]  # fmt: skip
    proc.spawn()
    assert proc.wait_ready(timeout_s), proc.log
    assert proc.ready is not None and proc.ready["role"] == "broker"
    return proc
