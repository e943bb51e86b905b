"""`python -m runtime.policy_server` as a process: endpoints, `ready`, clean shutdown on signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.support.server_process import ServerProcess
from transport.zmq_client import PolicyClient


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serves_then_shuts_down_cleanly_on_a_signal(tmp_path, sig):
    server = ServerProcess("--max-batch", "1", env={"HOME": str(tmp_path)})  # a fresh compile cache
    with server:
        ports = server.ports
        for endpoint in (
            f"router endpoint: tcp://127.0.0.1:{ports[0]}",
            f"pub endpoint: tcp://127.0.0.1:{ports[1]}",
            f"json websocket endpoint: ws://127.0.0.1:{ports[2]}",
            f"openpi websocket endpoint: ws://127.0.0.1:{ports[3]}",
        ):
            assert endpoint in server.log
        with PolicyClient(server.router, "probe", timeout_s=60) as client:
            out = client.infer({"base_0_rgb": np.zeros((224, 224, 3), np.uint8)}, "go", generate_subtask=False)
            assert out["actions"].shape == (50, 32)
        sent = time.monotonic()
        returncode = server.stop(sig)
        elapsed = time.monotonic() - sent
    assert returncode == 0, server.log
    assert "shutting down" in server.log
    print(f"shutdown took {elapsed:.2f} s")


def test_unknown_config_is_a_clear_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "runtime.policy_server", "--config", "pi05_tiyn"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "unknown model config 'pi05_tiyn'. Did you mean 'pi05_tiny'?" in result.stderr
    assert "model:" not in result.stderr, "a line about a model came before the config error"


def test_a_port_in_use_is_a_clear_error(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "runtime.policy_server", "--max-batch", "1", "--router-port", str(port),
             "--pub-port", "0", "--ws-port", "0", "--openpi-port", "0"],
            capture_output=True, text=True, timeout=240, env={**os.environ, "HOME": str(tmp_path)},
        )  # fmt: skip
    assert result.returncode == 2
    assert f"cannot bind a ZMQ endpoint on 127.0.0.1: Address already in use (addr='tcp://127.0.0.1:{port}')" in (
        result.stderr
    )
