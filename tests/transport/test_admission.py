"""Admission at the wire edge (`transport.admission`): the caps and bounds on their own, then the single
server and the fleet broker side by side on real sockets, answering the same hostile messages with
the same bytes."""

from __future__ import annotations

import asyncio
import dataclasses

import msgpack
import numpy as np
import pytest
import zmq
import zmq.asyncio

from runtime.fleet.broker import Broker, BrokerSettings
from runtime.fleet.protocol import READY, message, payload, split
from transport import admission, codec
from transport.admission import Admission, AdmissionLimits
from transport.errors import TransportError
from transport.zmq_server import ZmqServer, ZmqServerSettings

SMALL = AdmissionLimits(
    max_message_bytes=4096,
    max_in_flight=4,
    max_in_flight_per_peer=1,
    max_in_flight_per_principal=2,
    max_in_flight_per_internal_peer=3,
)


def _infer(request_id: int, robot: str = "arm") -> list[bytes]:
    header = {"type": "infer", "id": request_id, "robot": robot, "options": {"high_level_prompt": "go"}}
    return codec.encode(header, {"image/base_0_rgb": np.zeros((4, 4, 3), np.uint8)})


def _ping(request_id: int) -> list[bytes]:
    return codec.encode({"type": "ping", "id": request_id})


def _refused(gate: Admission, body: list, identity: bytes, internal: bool, principal: str) -> TransportError:
    with pytest.raises(TransportError) as e:
        gate.admit(body, identity, internal, principal)
    return e.value


def test_each_cap_answers_busy_with_its_own_words():
    gate = Admission(SMALL)
    gate.take(b"a", False, "host1")
    assert _refused(gate, _infer(1), b"a", False, "host1").to_wire() == {
        "code": "busy",
        "message": "this client has 1 requests in flight, the limit",
    }
    gate.take(b"b", False, "host1")
    assert _refused(gate, _infer(2), b"c", False, "host1").to_wire() == {
        "code": "busy",
        "message": "this client's address (or key) has 2 requests in flight, the limit",
    }
    gate.take(b"d", False, "host2")
    gate.take(b"e", False, "host3")
    assert _refused(gate, _infer(3), b"f", False, "host4").to_wire() == {
        "code": "busy",
        "message": "the server has too many requests in flight; retry later",
    }


def test_a_ping_passes_every_cap():
    """A health check must answer under load."""
    gate = Admission(dataclasses.replace(SMALL, max_in_flight=1))
    gate.take(b"a", False, "host1")
    assert gate.admit(_ping(1), b"a", False, "host1").type == "ping"


def test_settling_gives_the_place_back_and_counts_nothing_twice():
    gate = Admission(SMALL)
    gate.take(b"a", False, "host1")
    gate.settle(b"a", False, "host1")
    assert gate.in_flight == 0
    assert gate.admit(_infer(1), b"a", False, "host1").id == 1
    gate.take(b"a", False, "host1")
    gate.take(b"b", False, "host1")
    gate.settle(b"a", False, "host1")
    assert _refused(gate, _infer(2), b"b", False, "host1").code == "busy"  # b's own request still counts


def test_a_gateway_connection_has_its_own_cap_and_no_principal_cap():
    """A gateway peer (one WebSocket connection) holds a JSON batch: its cap is the internal one, and
    the gateway, not the principal cap, bounds its connections."""
    gate = Admission(dataclasses.replace(SMALL, max_in_flight=100))
    for _ in range(3):
        gate.admit(_infer(1, "@json/1"), b"g", True, "@67")
        gate.take(b"g", True, "@67")
    assert _refused(gate, _infer(2, "@json/1"), b"g", True, "@67").message == (
        "this client has 3 requests in flight, the limit"
    )
    assert gate.admit(_infer(3, "@json/2"), b"h", True, "@67").id == 3


def test_a_public_peer_does_not_share_the_count_of_a_gateway_with_its_identity():
    """Identities are chosen by the peer: a robot naming itself as a gateway's connection must neither
    use up that connection's places nor be refused for them."""
    gate = Admission(dataclasses.replace(SMALL, max_in_flight=100))
    gate.take(b"same", True, "@73616d65")
    assert gate.admit(_infer(1), b"same", False, "host1").id == 1


def test_size_is_checked_before_decoding():
    """An oversize message is refused unread: no decoding work for what cannot be admitted."""
    body = [b"\xc1" * 5000]  # not msgpack at all: decoding would say bad_header
    assert _refused(Admission(SMALL), body, b"a", False, "host1").code == "oversize"


def test_a_decoder_bug_becomes_an_internal_error(monkeypatch):
    def broken(*_):
        raise KeyError("boom")

    monkeypatch.setattr(admission.codec, "decode", broken)
    error = _refused(Admission(SMALL), _infer(1), b"a", False, "host1")
    assert error.to_wire() == {"code": "internal", "message": "internal error: KeyError"}


def test_a_rejection_names_the_request_when_it_can():
    error = TransportError("no", "busy")
    assert admission.rejection(_infer(7), error) == {"type": "error", "id": 7, "error": error.to_wire()}
    assert admission.rejection([b"\xc1"], error)["id"] is None


# ------------------------------------------------------------------ the server and the broker alike

HOSTILE = {
    "busy": _infer(2),  # a second request of a peer whose cap is 1
    "oversize": [msgpack.packb({"v": 1, "type": "infer", "id": 3}), b"\0" * 5000],
    "bad_header": [b"\xc1"],
    "unknown_type": codec.encode({"type": "nope", "id": 4}),
}


async def _answers(endpoint: str) -> dict[str, list[bytes]]:
    """Holds one request in flight at `endpoint`, then sends each hostile message and a ping: the
    replies, by what was sent."""
    ctx = zmq.asyncio.Context.instance()
    robot = ctx.socket(zmq.DEALER)
    robot.setsockopt(zmq.LINGER, 0)
    robot.connect(endpoint)
    try:
        await robot.send_multipart(_infer(1))  # held: neither the handler nor the worker answers it
        replies = {}
        for name, body in [*HOSTILE.items(), ("ping", _ping(5))]:
            await robot.send_multipart(body)
            replies[name] = await asyncio.wait_for(robot.recv_multipart(), 10)
        return replies
    finally:
        robot.close(linger=0)


def test_the_server_and_the_broker_refuse_alike():
    """The same admission at both edges: every refusal is the same bytes, and both answer a ping
    while the robot's cap is full."""
    limits = dataclasses.replace(SMALL, max_in_flight=100)

    async def pong_or_never(_peer, request):
        if request.type != "ping":
            await asyncio.Event().wait()
        return {}, {}

    async def from_server() -> dict[str, list[bytes]]:
        server = ZmqServer(ZmqServerSettings("tcp://127.0.0.1:*", pub_endpoints=(), admission=limits), pong_or_never)
        await server.start()
        try:
            assert server.router_endpoint is not None
            return await _answers(server.router_endpoint)
        finally:
            await server.close()

    broker = Broker(
        BrokerSettings(
            "tcp://127.0.0.1:*",
            pub_endpoints=(),
            backend_endpoint="tcp://127.0.0.1:*",
            xsub_endpoint="tcp://127.0.0.1:*",
            heartbeat_s=30.0,  # the silent worker stays joined throughout
            admission=limits,
        )
    )
    broker.start()
    worker = zmq.Context.instance().socket(zmq.DEALER)
    worker.setsockopt(zmq.LINGER, 0)
    try:
        worker.connect(broker.backend_endpoint)
        worker.send_multipart(message(READY, payload({"name": "w0", "capacity": 1, "info": {}})))
        assert worker.poll(10_000) and split(worker.recv_multipart())[0] == READY
        assert broker.router_endpoint is not None
        by_broker = asyncio.run(_answers(broker.router_endpoint))
        assert broker.admission.in_flight == 1
    finally:
        worker.close(linger=0)
        broker.close()
    by_server = asyncio.run(from_server())

    for name in HOSTILE:
        assert by_server[name] == by_broker[name], name
        header, _ = codec.decode(by_server[name])
        assert header["type"] == "error" and header["error"]["code"] == name, header
    for pong in (by_server["ping"], by_broker["ping"]):
        assert codec.decode(pong)[0]["type"] == "pong"
