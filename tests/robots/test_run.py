"""`python -m robots.run`: endpoints as host:port, an unreachable server in one line, flat stats."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from robots import run as robots_run
from tests.support.ports import free_local_ports
from tests.support.serving import zmq_server_thread
from transport.zmq_client import PolicyClient


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
