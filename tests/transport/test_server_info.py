"""The `server` block of `ping` (`transport.server_info`), as the single server's service and a fleet's
broker answer it: one layout, one name, version and protocol (docs/protocol.md, sections 1 and 6)."""

from __future__ import annotations

from collections.abc import Callable

import zmq

from runtime.fleet.broker import Broker, BrokerSettings
from runtime.fleet.protocol import HEARTBEAT, READY, message, payload, split
from runtime.policy_server.fixed_backend import FixedBackend
from runtime.policy_server.service import PolicyService, ServiceLimits
from runtime.robot.virtual_time import VirtualClock
from transport import codec
from transport.server_info import version

SINGLE_SERVER = [
    "name", "version", "protocol", "uptime_s", "epoch", "healthy", "sessions", "refreshing",
    "expired_sessions", "evicted_sessions", "min_refresh_interval_s",
]  # fmt: skip


async def _publish(topic: str, message_: dict) -> None:
    pass


def _service() -> PolicyService:
    return PolicyService(FixedBackend(), _publish, limits=ServiceLimits(min_refresh_interval_s=0.25))


def _step_until(broker: Broker, condition: Callable[[], object]) -> None:
    for _ in range(500):  # failure detection only
        if condition():
            return
        broker.step(0.01)
    raise AssertionError("the condition never held")


def test_the_single_server_block_is_the_documented_one():
    server = _service().ping()["server"]
    assert list(server) == SINGLE_SERVER
    assert (server["name"], server["protocol"], server["min_refresh_interval_s"]) == ("pi05-runtime", 1, 0.25)
    assert server["version"] == version() != ""


def test_the_broker_block_is_the_single_servers_less_what_its_workers_count(tmp_path):
    """A robot moved from a single server to a fleet reads the same fields, the same name, version
    and protocol; the sessions a worker ended are its own, so the broker leaves them out."""
    worker_ping = _service().ping()
    clock = VirtualClock(0.0)
    broker = Broker(
        BrokerSettings(
            f"ipc://{tmp_path}/router",
            pub_endpoints=(),
            backend_endpoint=f"ipc://{tmp_path}/back",
            xsub_endpoint=f"ipc://{tmp_path}/xsub",
        ),
        clock=clock,
    )
    broker.bind()
    ctx = zmq.Context()
    try:
        worker, robot = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
        worker.connect(broker.backend_endpoint)
        robot.connect(broker.router_endpoint)
        worker.send_multipart(message(READY, payload({"name": "w0", "capacity": 1, "info": worker_ping})))
        status = {"sessions": 3, "refreshing": 2, "healthy": True}
        worker.send_multipart(message(HEARTBEAT, payload(status)))
        # The heartbeat in before the ping: they come on different sockets.
        _step_until(broker, lambda: any(w.status.get("sessions") == 3 for w in broker.table.workers.values()))
        robot.send_multipart(codec.encode({"type": "ping", "id": 1}))
        _step_until(broker, lambda: robot.poll(0))
        pong, _ = codec.decode(robot.recv_multipart(zmq.NOBLOCK))
        assert split(worker.recv_multipart(zmq.NOBLOCK))[0] == READY
    finally:
        ctx.destroy(linger=0)
        broker.close()
    server = pong["data"]["server"]
    assert list(server) == [k for k in SINGLE_SERVER if k not in ("expired_sessions", "evicted_sessions")]
    mine = {k: server[k] for k in ("name", "version", "protocol", "min_refresh_interval_s")}
    assert mine == {k: worker_ping["server"][k] for k in mine}
    assert (server["sessions"], server["refreshing"], server["healthy"]) == (3, 2, True)
    assert pong["data"]["model"] == worker_ping["model"]
