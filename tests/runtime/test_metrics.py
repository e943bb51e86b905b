"""`--metrics-port`: `/metrics` of a live server and of a `--workers 2` front host, scraped over HTTP
and read with prometheus-client's own parser before and after requests of known kinds."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import urllib.request
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from runtime.fleet.broker import Broker, BrokerSettings
from runtime.fleet.metrics import BrokerCollector
from runtime.robot.metrics import LoopMetrics
from tests.support.eventually import eventually
from tests.support.ports import free_local_ports
from tests.support.server_process import ServerProcess, broker_process
from transport.errors import RemoteError
from transport.ws_client import JsonApiClient
from transport.zmq_client import PolicyClient

CAP_S = 60.0  # failure detection only
IMAGES = {"base_0_rgb": np.zeros((8, 8, 3), np.uint8)}
N = 7


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of `/metrics` by (name, sorted labels)."""
    with urllib.request.urlopen(url, timeout=CAP_S) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def moved(before: dict, after: dict, name: str, **labels: str) -> float:
    return sample(after, name, **labels) - sample(before, name, **labels)


def requests_of_known_kinds(router: str) -> None:
    """N infers answered, then one refused (an unknown camera: `bad_request`), then a subtask."""
    with PolicyClient(router, "metrics-arm", timeout_s=CAP_S) as client:
        for _ in range(N):
            client.infer(IMAGES, "pick up the cup", generate_subtask=False)
        with pytest.raises(RemoteError) as refused:
            client.infer({"no_such_camera": IMAGES["base_0_rgb"]}, "pick up the cup")
        assert refused.value.code == "bad_request"
        client.subtask(IMAGES, "pick up the cup")


@pytest.fixture(scope="module")
def server():
    (port,) = free_local_ports(1)
    with ServerProcess("--fixed-reply", "--metrics-port", str(port)) as srv:
        yield srv


def test_requests_move_their_counters_by_exactly_their_number(server):
    url = server.ready["endpoints"]["metrics"]
    before = scrape(url)
    requests_of_known_kinds(server.router)
    after = scrape(url)
    zmq_infer = {"type": "infer", "transport": "zmq"}
    assert moved(before, after, "pi05_requests_total", **zmq_infer, outcome="ok") == N
    assert moved(before, after, "pi05_requests_total", **zmq_infer, outcome="bad_request") == 1
    assert moved(before, after, "pi05_requests_total", type="subtask", transport="zmq", outcome="ok") == 1
    assert moved(before, after, "pi05_request_seconds_count", **zmq_infer) == N + 1
    # The engine's stages: the fixed backend answers each request as a batch of one.
    assert moved(before, after, "pi05_engine_total_seconds_count", kind="infer", batch="1") == N
    assert moved(before, after, "pi05_engine_action_seconds_count", kind="infer", batch="1") == N
    assert moved(before, after, "pi05_engine_subtask_seconds_count", kind="subtask", batch="1") == 1
    assert moved(before, after, "pi05_engine_batches_total", phase="action", rows="1") == N
    assert sample(after, "pi05_engine_healthy") == 1
    assert sample(after, "process_resident_memory_bytes") > 0  # the library's process collector
    assert sample(after, "pi05_sessions") >= 1


def test_a_gateway_connection_gauge_follows_a_client(server):
    url = server.ready["endpoints"]["metrics"]

    def connections() -> float:
        return sample(scrape(url), "pi05_gateway_connections", gateway="json")

    assert connections() == 0

    async def hold_open(opened: asyncio.Event, release: asyncio.Event) -> None:
        async with JsonApiClient(server.ws, retries=0):
            opened.set()
            await release.wait()

    async def scenario() -> tuple[bool, bool]:
        opened, release = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(hold_open(opened, release))
        await asyncio.wait_for(opened.wait(), CAP_S)
        seen_open = await asyncio.to_thread(eventually, lambda: connections() == 1, CAP_S)
        release.set()
        await task
        return seen_open, await asyncio.to_thread(eventually, lambda: connections() == 0, CAP_S)

    seen_open, seen_closed = asyncio.run(scenario())
    assert seen_open, "the json gateway's connection never showed"
    assert seen_closed, "the json gateway's connection never went away"


def test_many_robot_ids_make_no_more_series_than_a_few(server):
    url = server.ready["endpoints"]["metrics"]

    def robots_ask(robots: int, requests: int) -> None:
        clients = [PolicyClient(server.router, f"series-{r}", timeout_s=CAP_S) for r in range(robots)]
        try:
            for i in range(requests):
                clients[i % robots].infer(IMAGES, "pick up the cup", generate_subtask=False)
        finally:
            for client in clients:
                client.close()

    robots_ask(10, 10)
    few = set(scrape(url))
    robots_ask(200, 1000)
    many = set(scrape(url))
    assert many == few, f"series added by robot ids: {sorted(many - few)[:5]}"


def test_a_front_host_counts_through_its_broker():
    (port,) = free_local_ports(1)
    with ServerProcess("--workers", "2", "--fixed-reply", "--metrics-port", str(port), gateways=False) as srv:
        url = srv.ready["endpoints"]["metrics"]
        before = scrape(url)
        assert sample(before, "pi05_fleet_workers") == 2
        requests_of_known_kinds(srv.router)
        after = scrape(url)
    zmq_infer = {"type": "infer", "transport": "zmq"}
    assert moved(before, after, "pi05_requests_total", **zmq_infer, outcome="ok") == N
    assert moved(before, after, "pi05_requests_total", **zmq_infer, outcome="bad_request") == 1
    assert moved(before, after, "pi05_request_seconds_count", **zmq_infer) == N + 1
    routed = sum(v for (name, _), v in after.items() if name == "pi05_fleet_routed_total")
    routed_before = sum(v for (name, _), v in before.items() if name == "pi05_fleet_routed_total")
    assert routed - routed_before == N + 2  # the infers, the refused one and the subtask: all went to workers


# The parts of Grafana's dashboard JSON model (grafana.com/docs/grafana/latest/dashboards/build-dashboards/
# view-dashboard-json-model/) an import reads: a dashboard and its panels, each query with its refId.
DASHBOARD_SCHEMA = {
    "type": "object",
    "required": ["title", "uid", "schemaVersion", "panels", "editable", "graphTooltip", "time"],
    "properties": {
        "title": {"type": "string", "minLength": 1},
        "uid": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,40}$"},
        "schemaVersion": {"type": "integer", "minimum": 36},
        "editable": {"type": "boolean"},
        "graphTooltip": {"enum": [0, 1, 2]},
        "time": {"type": "object", "required": ["from", "to"]},
        "__inputs": {"type": "array", "items": {"type": "object", "required": ["name", "type", "pluginId"]}},
        "panels": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["id", "type", "title", "gridPos", "targets", "datasource"],
                "properties": {
                    "id": {"type": "integer"},
                    "type": {"enum": ["timeseries", "stat", "gauge", "table", "bargauge"]},
                    "gridPos": {
                        "type": "object",
                        "required": ["h", "w", "x", "y"],
                        "properties": {k: {"type": "integer", "minimum": 0} for k in "hwxy"},
                    },
                    "targets": {
                        "type": "array",
                        "minItems": 1,
                        "items": {"type": "object", "required": ["refId", "expr"]},
                    },
                },
            },
        },
    },
}


def _exported_names(text: str) -> set[str]:
    """Every sample name the families in `text` can have (a family listed with no samples yet too)."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created")}
    names = set()
    for family in text_string_to_metric_families(text):
        names |= {family.name + s for s in suffixes.get(family.type, ("",))}
    return names


def test_the_dashboard_loads_and_queries_only_exported_metrics(server):
    dashboard = json.loads((Path(__file__).parents[2] / "docs/grafana/pi05-runtime.json").read_text())
    jsonschema.validate(dashboard, DASHBOARD_SCHEMA)
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    requests_of_known_kinds(server.router)
    with urllib.request.urlopen(server.ready["endpoints"]["metrics"], timeout=CAP_S) as response:
        exported = _exported_names(response.read().decode())
    fleet, robot = CollectorRegistry(), CollectorRegistry()
    fleet.register(BrokerCollector(Broker(BrokerSettings())))
    LoopMetrics(robot)
    exported |= _exported_names(generate_latest(fleet).decode()) | _exported_names(generate_latest(robot).decode())
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\b((?:pi05|process)_[a-z0-9_]+)", target["expr"])
    }
    assert queried, "no query names a metric"
    assert queried <= exported, f"queried but not exported: {sorted(queried - exported)}"


def test_a_stand_alone_broker_serves_its_fleet_figures():
    ports = free_local_ports(5)
    broker = broker_process(ports[:4], "--metrics-port", str(ports[4]))
    try:
        url = broker.ready["endpoints"]["metrics"]
        assert url == f"http://127.0.0.1:{ports[4]}/metrics"
        before = scrape(url)
        assert sample(before, "pi05_fleet_workers") == 0
        with PolicyClient(broker.router, "lonely", timeout_s=CAP_S, retries=0) as client:
            with pytest.raises(RemoteError) as refused:
                client.infer(IMAGES, "pick up the cup")
        assert refused.value.code == "unavailable"  # no worker joined
        after = scrape(url)
        assert moved(before, after, "pi05_requests_total", type="infer", transport="zmq", outcome="unavailable") == 1
    finally:
        broker.stop()


def _threads(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Threads:")))


def test_hostile_http_on_the_metrics_port_leaves_it_serving_with_bounded_threads_and_memory(server):
    """Idle connections past the cap, random bytes, an oversized request line, a flood of headers, a
    large body and odd methods: robots are still served, `/metrics` answers again once the idle
    connections time out, and the server's threads and memory stay bounded."""
    url = server.ready["endpoints"]["metrics"]
    host, port = url.removeprefix("http://").split("/")[0].split(":")
    pid = server.proc.pid
    threads, memory = _threads(pid), server.rss_mb()["server"]
    rng = np.random.default_rng(0)
    idle = [socket.create_connection((host, int(port))) for _ in range(200)]
    garbage = [
        rng.integers(0, 256, 70_000, dtype=np.uint8).tobytes(),
        b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\n" + b"X-A: b\r\n" * 500 + b"\r\n",
        b"POST /metrics HTTP/1.1\r\nContent-Length: 10000000\r\n\r\n" + b"x" * 1_000_000,
        b"DELETE /metrics HTTP/1.1\r\n\r\n",
        b"\r\n\r\n\r\n",
    ]
    for payload in garbage:
        with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=CAP_S) as s:
            s.sendall(payload)
            s.settimeout(CAP_S)
            s.recv(1024)
    assert _threads(pid) - threads <= 20, "a thread per connection past the cap"
    with PolicyClient(server.router, "beside-the-flood", timeout_s=CAP_S) as client:
        client.infer(IMAGES, "pick up the cup", generate_subtask=False)
    assert eventually(lambda: _scrapes(url), CAP_S), "/metrics never answered again"
    for s in idle:
        s.close()
    assert server.rss_mb()["server"] - memory < 50


def _scrapes(url: str) -> bool:
    try:
        return "pi05_requests_total" in urllib.request.urlopen(url, timeout=5).read().decode()
    except OSError:
        return False
