"""`robots.run --metrics-port`'s figures (`runtime.robot.metrics.LoopMetrics`) against the loop's own
summary, on the simulated clock: each counter equals what the loop counted, across episodes too."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from runtime.robot.metrics import LoopMetrics
from runtime.robot.virtual_time import VirtualClock
from tests.support.eventually import eventually
from tests.support.ports import free_local_ports
from tests.support.server_process import ServerProcess
from tests.support.simulated_loop import START_S, CountingRobot, SimServer, simulated_loop

CAP_S = 60.0  # failure detection only


def _value(registry: CollectorRegistry, name: str) -> float:
    value = registry.get_sample_value(name)
    assert value is not None, name
    return value


def test_the_loop_figures_equal_its_summary_across_two_loops():
    registry = CollectorRegistry()
    metrics = LoopMetrics(registry)
    summaries = []
    for down in (None, (START_S + 1.0, START_S + 2.0)):  # the second run has an outage
        clock = VirtualClock(START_S)
        robot = CountingRobot(clock)
        server = SimServer(clock, 0.49, down=down)
        loop = simulated_loop(
            server, robot, on_tick=metrics, buffer={"request_when_left": 10}, max_in_flight=1, request_timeout_s=0.5
        )
        summaries.append(loop.run(3.0))
    total = {k: sum(s[k] for s in summaries) for k in ("ticks", "underruns", "chunks_received", "outages")}
    assert total["underruns"] > 0 and total["outages"] == 1  # the figures below are not all zeros
    assert _value(registry, "pi05_loop_ticks_total") == total["ticks"]
    assert _value(registry, "pi05_loop_underruns_total") == total["underruns"]
    assert _value(registry, "pi05_loop_chunks_received_total") == total["chunks_received"]
    assert _value(registry, "pi05_loop_outages_total") == total["outages"]
    assert _value(registry, "pi05_loop_jitter_seconds_count") == total["ticks"]
    # Every chunk merged during the ticks (the first one is merged before the clock starts).
    merged = _value(registry, "pi05_loop_inference_delay_seconds_count")
    assert total["chunks_received"] - len(summaries) <= merged <= total["chunks_received"]
    assert _value(registry, "pi05_loop_inference_delay_steps_count") == merged
    assert _value(registry, "pi05_loop_outage_seconds_total") > 0


def test_robots_run_serves_its_figures_while_it_runs():
    """`robots.run --metrics-port` against a fixed-reply server: `/metrics` shows the loop's ticks
    growing while it runs, in Prometheus' format, and the run ends cleanly."""
    (port,) = free_local_ports(1)
    url = f"http://127.0.0.1:{port}/metrics"
    with ServerProcess("--fixed-reply", gateways=False) as server:
        argv = [sys.executable, "-m", "robots.run", "--server", server.router, "--task", "none"]
        argv += ["--duration", "30", "--metrics-port", str(port), "--log-format", "json"]
        robot = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert eventually(lambda: _ticks(url) > 0, CAP_S), "no ticks were ever exported"
            first = _ticks(url)
            assert eventually(lambda: _ticks(url) > first, CAP_S), "the ticks did not grow"
        finally:
            robot.send_signal(signal.SIGINT)
            _, err = robot.communicate(timeout=CAP_S)
    assert robot.returncode == 0, err
    assert all(json.loads(line)["role"] == "robot" for line in err.splitlines() if line.startswith("{"))


def _ticks(url: str) -> float:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return -1.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "pi05_loop_ticks_total":
                return s.value
    return 0.0
