"""`python -m robots.run`: endpoints as host:port, an unreachable server in one line, flat stats; the
sim arm set up from the server's ping (the shipped demo policy's task, cameras and sizes), and a flag
that contradicts the model in one line."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from configs import DEMO_MODEL
from robots import run as robots_run
from runtime.policy_server.fixed_backend import FixedBackend
from tests.support.ports import free_local_ports
from tests.support.server_process import ServerProcess
from tests.support.serving import zmq_server_thread
from transport.zmq_client import PolicyClient


@pytest.fixture(scope="module")
def demo_server():
    """The server as the quickstart runs it, its default model (the shipped demo policy), in its own
    process."""
    with ServerProcess("--config", DEMO_MODEL, "--max-batch", "1", gateways=False) as server:
        yield server


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "robots.run", *argv], capture_output=True, text=True, timeout=600)


def test_an_unreachable_server_is_one_clear_line_without_a_traceback():
    (port,) = free_local_ports(1)
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "robots.run", "--server", f"127.0.0.1:{port}", "--connect-timeout", "1",
         "--timeout", "120", "--log-level", "WARNING"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f"robots.run: error: cannot reach the policy server at tcp://127.0.0.1:{port}: no connection for 1 s "
        "(is it running, and is the address right?)"
    ]
    assert elapsed < 120  # reported by the connect timeout, not after the request timeout


@pytest.mark.parametrize("flag", ["--server", "--pub"])
def test_endpoints_take_host_port_or_a_tcp_url(flag):
    dest = flag.removeprefix("--")
    parser = robots_run.build_parser()
    assert getattr(parser.parse_args([flag, "localhost:5555"]), dest) == "tcp://localhost:5555"
    assert getattr(parser.parse_args([flag, "tcp://10.0.0.2:6000"]), dest) == "tcp://10.0.0.2:6000"


def test_a_bad_endpoint_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        robots_run.build_parser().parse_args(["--server", "localhost"])
    assert info.value.code == 2
    assert "expected host:port or tcp://host:port with a port in 1..65535, got 'localhost'" in capsys.readouterr().err


def test_the_cli_writes_flat_stats_and_signs_off(engine, tmp_path):
    out = tmp_path / "stats.json"
    with zmq_server_thread(engine) as server:
        router = server.endpoints["router"].removeprefix("tcp://")  # host:port works as well
        code = robots_run.main(
            ["--server", router, "--pub", server.endpoints["pub"], "--hz", "50", "--duration", "1.5",
             "--stats-json", str(out), "--subtask", "off", "--request-when-left", "40", "--log-level", "WARNING"]
        )  # fmt: skip
        with PolicyClient(server.endpoints["router"], "probe") as probe:
            sessions = probe.ping()["server"]["sessions"]
    assert code == 0
    stats = json.loads(out.read_text())
    for key in (
        "ticks", "achieved_hz", "jitter_ms_p50", "jitter_ms_p99", "underruns", "chunks_received",
        "inference_delay_ms_p50", "inference_delay_ms_p99", "subtasks_seen", "outages", "outage_s",
        "server_restarts",
    ):  # fmt: skip
        assert key in stats and not isinstance(stats[key], dict | list)
    assert stats["ticks"] == 75 and stats["chunks_received"] >= 1 and stats["outages"] == 0
    assert sessions == 0  # the robot said bye


def test_the_sim_sets_itself_up_from_the_servers_ping_and_runs_the_demo_task(demo_server, tmp_path):
    out = tmp_path / "stats.json"
    # No robot flags: the defaults have no task, 4 state values and 224-pixel cameras, which the
    # demo policy (3 state values, trained on pick-place at 48x48) refuses.
    result = run_cli(
        "--server", demo_server.router, "--pub", demo_server.pub, "--duration", "10", "--episode-s", "2",
        "--stats-json", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "norm stats expect" not in result.stderr
    assert (
        "the sim arm, set up for pi05_demo: task pick-place, cameras base_0_rgb, left_wrist_0_rgb, "
        "right_wrist_0_rgb at 48x48, state 3, actions 3"
    ) in result.stderr
    stats = json.loads(out.read_text())
    # Each episode ends at success or after 2 s of ticks: two at least in 10 s, each with its chunks.
    assert stats["episodes"] >= 2 and 0 <= stats["episodes_succeeded"] <= stats["episodes"]
    assert stats["chunks_received"] >= stats["episodes"] and stats["request_errors"] == 0
    assert stats["subtasks_seen"] >= stats["episodes"]  # the model's subtasks reached the robot
    done = f"robots.run: pick-place: {stats['episodes_succeeded']} of {stats['episodes']} episodes done; "
    assert done + f"underruns {stats['underruns']}, chunks {stats['chunks_received']}" in result.stderr
    # Not a terminal: plain status lines, no carriage returns piling up on one line.
    assert "\r" not in result.stderr and "pi05_demo | episode 1 (0 done) | " in result.stderr


def test_a_flag_that_contradicts_the_model_is_one_line_naming_the_fix(demo_server):
    result = run_cli("--server", demo_server.router, "--task", "none", "--log-level", "WARNING")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "robots.run: the server's model pi05_demo (trained on pick-place) takes 3 state values and gives 3 action "
        "values; the sim arm without a task has 4 state values and takes 4: use --task pick-place"
    ]


def test_the_task_runs_by_hand_against_a_model_not_trained_on_it(tmp_path, caplog):
    out = tmp_path / "stats.json"
    caplog.set_level("INFO")
    with zmq_server_thread(FixedBackend("pi05_tiny")) as server:
        code = robots_run.main(
            ["--server", server.endpoints["router"], "--pub", server.endpoints["pub"], "--task", "pick-place",
             "--duration", "1.5", "--episode-s", "0.5", "--stats-json", str(out)]
        )  # fmt: skip
    assert code == 0
    assert "the server's model pi05_tiny was not trained on pick-place: expect no successes" in caplog.text
    assert "task pick-place, cameras base_0_rgb, left_wrist_0_rgb, right_wrist_0_rgb at 224x224" in caplog.text
    stats = json.loads(out.read_text())
    # Zero actions send the gripper to the arm's base: every episode runs out its 0.5 s (25 ticks).
    assert stats["episodes"] >= 2 and stats["episodes_succeeded"] == 0
    assert 25 <= stats["ticks"] <= 25 * stats["episodes"]
