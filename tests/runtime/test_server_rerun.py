"""The policy server's `--rerun save`: per robot session, what the model received (cameras at its input
resolution, the state) and answered (subtasks, refreshes marked, the chunk, the latency), read back with
Rerun's own reader; a front host refuses the flag in one line."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from tests.support.eventually import eventually
from tests.support.rerun_files import read_rrd
from tests.support.server_process import ServerProcess
from transport.zmq_client import PolicyClient

CAP_S = 60.0  # failure detection only
N = 4


def test_a_servers_view_is_read_back_per_session(tmp_path):
    path = tmp_path / "server.rrd"
    images = {"base_0_rgb": np.full((224, 224, 3), 7, np.uint8)}
    with ServerProcess("--fixed-reply", "--rerun", "save", str(path), gateways=False) as srv:
        with PolicyClient(srv.router, "arm-7", timeout_s=CAP_S) as client:
            for _ in range(N):
                client.infer(images, "pick up the cup", state=np.arange(3, dtype=np.float32), generate_subtask=False)
            client.subtask(images, "pick up the cup")
            heard: list[dict] = []
            client.listen_refreshes(srv.pub, heard.append)
            client.set_refresh(0.1)
            assert eventually(lambda: (client.poll(0.01), len(heard) >= 2)[1], CAP_S)
            client.bye()
    rows = read_rrd(path)
    base = "/server/arm-7"
    assert len(rows[f"{base}/camera/base_0_rgb"]) >= N + 1
    assert len(rows[f"{base}/chunk"]) == N
    assert len(rows[f"{base}/latency_ms"]) >= N + 1
    assert len(rows[f"{base}/state/2"]) >= N
    subtasks = [r for r in rows[f"{base}/subtask"] if r.get("TextLog:text") is not None]
    texts = [t for r in subtasks for t in r["TextLog:text"]]
    assert any(t == "fixed reply" for t in texts) and any(t.endswith("(refresh)") for t in texts), texts
    steps = [r["step"] for r in rows[f"{base}/latency_ms"]]
    assert steps == sorted(steps) and steps[0] == 1


def test_a_front_host_refuses_rerun_in_one_line():
    result = subprocess.run(
        [sys.executable, "-m", "runtime.policy_server", "--workers", "2", "--rerun", "save", "x.rrd"],
        capture_output=True,
        text=True,
        timeout=CAP_S,
    )
    assert result.returncode == 2
    assert "--rerun logs one engine's view" in result.stderr
