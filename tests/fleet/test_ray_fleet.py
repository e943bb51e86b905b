"""A fleet on Ray (`--ray local --replicas 2`): both replicas serve robots, a replica whose actor
process is killed is restarted by Ray and serves again while every loop keeps getting chunks, and the
front host's exit leaves no Ray process behind. The scenario runs in a network namespace with only
loopback (`unshare -n`, as root), where Ray listens on 127.0.0.1 alone (`tests/support/ray_scenario.py`)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from tests.support.server_process import REPO

CAP_S = 1500.0  # failure detection only: on two busy cores the scenario took over 10 minutes
STOP_S = 120.0


def _can_unshare() -> bool:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    return subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_unshare(), reason="needs `unshare -n` (root) for a loopback-only network namespace")
@pytest.mark.timeout(CAP_S + 2 * STOP_S)
def test_ray_replicas_serve_restart_after_a_kill_and_leave_nothing_behind(tmp_path):
    out = tmp_path / "report.json"
    script = f"ip link set lo up && exec {sys.executable} -m tests.support.ray_scenario {out}"
    # A session of its own: past the deadline the whole scenario is stopped (SIGTERM: it stops its
    # front host, which stops Ray), then killed, so nothing outlives the test.
    scenario = subprocess.Popen(
        ["unshare", "-n", "sh", "-c", script], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = scenario.communicate(timeout=CAP_S)
    except subprocess.TimeoutExpired:
        os.killpg(scenario.pid, signal.SIGTERM)
        try:
            output, _ = scenario.communicate(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            os.killpg(scenario.pid, signal.SIGKILL)
            output, _ = scenario.communicate()
    assert out.exists(), output[-5000:]
    report = json.loads(out.read_text())
    assert "left_behind" in report, f"the scenario did not finish: {json.dumps(report, indent=1)[:4000]}"

    context = json.dumps(report, indent=1)[:4000]
    assert report["ready"]["role"] == "front host", context
    assert report["workers_at_start"] == ["ray-0@127.0.0.1", "ray-1@127.0.0.1"], context  # named by their node
    assert len(report["log_names_nodes"]) == 2, context
    assert report["spread"], "both replicas should have robots"
    assert report["left"] and report["rejoined"] and report["restarted_actor"], context
    assert report["restarted_serves"], context
    assert report["chunks_grew"] and report["loops_ended"], context
    summaries = report["summaries"]
    assert len(summaries) == 4 and all(s["chunks_received"] > 0 for s in summaries.values()), context
    # The killed replica's robots moved to the other (an outage is counted only by a loop whose request
    # was in flight at the kill, which depends on timing; the broker moving them does not).
    assert report["robots_moved"] >= report["killed"]["robots"] >= 1, context
    assert report["exit_code"] == 0, "".join(report["log_tail"])[-5000:]
    assert report["left_behind"] is True, f"left behind: {report['left_behind']}"
