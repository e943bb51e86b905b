"""A worker's link against a fake broker (a ROUTER this test drives): it joins, serves forwarded
requests through the single server's request path with the robot's identity and user, and when the
broker goes silent or says DISCONNECT it drops its sessions and joins again.

The fake broker acknowledges with a 50 ms heartbeat, so silence is noticed after 100 ms; the waits
below only bound a hang.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import zmq

from runtime.fleet.protocol import (
    DISCONNECT,
    HEARTBEAT,
    READY,
    REPLY,
    Envelope,
    message,
    payload,
    read_payload,
    read_seq,
    request_frames,
    split,
)
from runtime.fleet.worker_link import WorkerLink
from runtime.policy_server.fixed_backend import FixedBackend
from runtime.policy_server.service import PolicyService
from transport import codec
from transport.zmq_server import ZmqServer, ZmqServerSettings

BOUND_S = 10.0  # failure detection only
USER = "U" * 40


class FakeBroker:
    def __init__(self, endpoint: str):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)

    async def receive(self, wanted: bytes) -> tuple[bytes, list[bytes]]:
        """(worker identity, frames after the command) of the next `wanted` message."""
        deadline = asyncio.get_running_loop().time() + BOUND_S
        while asyncio.get_running_loop().time() < deadline:
            if self.sock.poll(0):
                identity, *frames = self.sock.recv_multipart()
                command, rest = split(frames)
                if command == wanted:
                    return identity, rest
            else:
                await asyncio.sleep(0.005)
        raise AssertionError(f"no {wanted!r} from the worker")

    def send(self, identity: bytes, frames: list) -> None:
        self.sock.send_multipart([identity, *frames])

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


@pytest.fixture
def endpoint(tmp_path):
    return f"ipc://{tmp_path}/back"


def _infer(request_id: int) -> list:
    header = {"type": "infer", "id": request_id, "robot": "arm", "options": {"high_level_prompt": "go"}}
    return codec.encode(header, {"image/base_0_rgb": np.zeros((4, 4, 3), np.uint8)})


async def _worker(endpoint: str) -> tuple[WorkerLink, PolicyService, ZmqServer]:
    server = ZmqServer(
        ZmqServerSettings(router_endpoint=None, pub_endpoints=()),
        lambda peer, request: service.handle(peer.principal, request, peer.user),
    )
    link = WorkerLink(endpoint, "w0", server)
    service = PolicyService(FixedBackend(), link.publish, link.subscribers, link.forget)
    await server.start()
    await link.start(service)
    return link, service, server


@pytest.mark.parametrize("how", ["silence", "disconnect"])
def test_a_worker_serves_then_rejoins_afresh_when_the_broker_loses_it(endpoint, how):
    async def scenario() -> None:
        broker = FakeBroker(endpoint)
        link, service, server = await _worker(endpoint)
        try:
            first, ready = await broker.receive(READY)
            assert read_payload(ready)["name"] == "w0" and "model" in read_payload(ready)["info"]
            ack = {"pub": f"{endpoint}-pub", "heartbeat_s": 0.05, "misses": 2}
            broker.send(first, message(READY, payload(ack)))
            await asyncio.wait_for(link.acked.wait(), BOUND_S)

            # A forwarded request is served as the robot's own, user included, and answered by seq.
            broker.send(first, request_frames(Envelope(9, b"\x00robot", False, USER), _infer(3)))
            _, rest = await broker.receive(REPLY)
            reply, arrays = codec.decode(rest[1:])
            assert read_seq(rest[0]) == 9 and reply["id"] == 3 and arrays["actions"].shape == (50, 32)
            assert list(service.sessions) == [f"{USER}/arm"]
            assert service.sessions[f"{USER}/arm"].principal == "@" + b"\x00robot".hex()
            await broker.receive(HEARTBEAT)  # it keeps the link alive while heard

            if how == "disconnect":
                broker.send(first, message(DISCONNECT))
            # else: the broker says nothing more; after 2 intervals the worker gives up on it.
            again, ready = await broker.receive(READY)
            assert again != first and read_payload(ready)["name"] == "w0"  # a new DEALER, joined afresh
            assert not service.sessions  # its robots were placed elsewhere meanwhile
            assert link.joins == 2
        finally:
            await link.close()
            await service.close()
            await server.close()
            broker.close()

    asyncio.run(scenario())
