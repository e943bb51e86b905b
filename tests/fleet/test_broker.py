"""The broker on real sockets (ipc) driven step by step on an injected clock: a fake worker and a raw
robot exchange frames with it, and heartbeat loss is a clock the test moves, not a wait.

`_pump` steps the broker until something arrives; its step limit only turns a hang into a failure.
"""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.fleet.broker import Broker, BrokerSettings
from runtime.fleet.protocol import (
    DISCONNECT,
    HEARTBEAT,
    PROTOCOL,
    READY,
    REPLY,
    REQUEST,
    message,
    payload,
    read_payload,
    read_request,
    reply_frames,
    split,
)
from runtime.robot.virtual_time import VirtualClock
from transport import codec
from transport.admission import AdmissionLimits

MAX_STEPS = 500  # failure detection only


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def broker(tmp_path):
    clock = VirtualClock()
    b = Broker(
        BrokerSettings(
            router_endpoint=f"ipc://{tmp_path}/router",
            pub_endpoints=(f"ipc://{tmp_path}/pub",),
            backend_endpoint=f"ipc://{tmp_path}/back",
            xsub_endpoint=f"ipc://{tmp_path}/xsub",
            heartbeat_s=0.5,
            heartbeat_misses=3,
            admission=AdmissionLimits(max_message_bytes=1024 * 1024, max_in_flight=1024),
        ),
        clock=clock,
    )
    b.bind()
    b.clock = clock
    yield b
    b.close()


def _socket(ctx: zmq.Context, kind: int, endpoint: str) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def _pump(broker: Broker, sock: zmq.Socket) -> list[bytes]:
    """Steps the broker until `sock` has a message; that message."""
    for _ in range(MAX_STEPS):
        broker.step(0.01)
        if sock.poll(0):
            return sock.recv_multipart()
    raise AssertionError("nothing arrived")


def _until(broker: Broker, condition) -> None:
    for _ in range(MAX_STEPS):
        if condition():
            return
        broker.step(0.01)
    raise AssertionError("the condition never held")


def _join(broker: Broker, ctx: zmq.Context, name: str = "w0") -> zmq.Socket:
    worker = _socket(ctx, zmq.DEALER, broker.backend_endpoint)
    worker.send_multipart(message(READY, payload({"name": name, "capacity": 1, "info": {"model": {"config": "x"}}})))
    command, rest = split(_pump(broker, worker))
    assert command == READY and read_payload(rest)["pub"] == broker.xsub_endpoint
    return worker


def _infer(request_id: int, robot: str = "arm") -> list:
    header = {"type": "infer", "id": request_id, "robot": robot, "options": {"high_level_prompt": "go"}}
    return codec.encode(header, {"image/base_0_rgb": np.zeros((4, 4, 3), np.uint8)})


def _next_command(broker: Broker, worker: zmq.Socket, wanted: bytes) -> list:
    """The frames after the command of the next `wanted` message the worker gets (heartbeats skipped)."""
    for _ in range(MAX_STEPS):
        command, rest = split(_pump(broker, worker))
        if command == wanted:
            return rest
    raise AssertionError(f"no {wanted!r}")


def test_a_worker_silent_for_its_misses_is_dropped_and_its_requests_answered_unavailable(broker, ctx):
    worker = _join(broker, ctx)
    robot = _socket(ctx, zmq.DEALER, broker.router_endpoint)
    robot.send_multipart(_infer(41))
    envelope, body = read_request(_next_command(broker, worker, REQUEST))
    assert codec.decode(body)[0]["id"] == 41 and envelope.user is None and not envelope.internal

    broker.clock.t = 1.5  # three intervals of silence: not yet
    broker.step(0.0)
    assert len(broker.table.workers) == 1
    broker.clock.t = 1.51
    broker.step(0.0)
    assert not broker.table.workers
    reply, _ = codec.decode(_pump(broker, robot))
    assert reply["type"] == "error" and reply["id"] == 41 and reply["error"]["code"] == "unavailable"

    # The presumed-dead worker speaks again: it is told to join afresh.
    worker.send_multipart(message(HEARTBEAT, payload({})))
    assert _next_command(broker, worker, DISCONNECT) == []
    # With no worker at all a request is answered at once, typed.
    robot.send_multipart(_infer(42))
    reply, _ = codec.decode(_pump(broker, robot))
    assert reply["error"]["code"] == "unavailable" and reply["id"] == 42


def test_a_worker_that_heartbeats_stays_and_its_replies_reach_the_robot(broker, ctx):
    worker = _join(broker, ctx)
    heartbeats = 0
    for step in range(1, 11):  # 4 s of broker time, the worker heard every 0.4 s
        broker.clock.t = 0.4 * step
        worker.send_multipart(message(HEARTBEAT, payload({"sessions": 3, "healthy": True})))
        _until(broker, lambda t=broker.clock.t: next(iter(broker.table.workers.values())).liveness.last_heard == t)
        while worker.poll(0):
            heartbeats += split(worker.recv_multipart())[0] == HEARTBEAT
    for _ in range(MAX_STEPS):  # the last ones may still be in flight (ipc delivers asynchronously)
        if heartbeats >= 8:
            break
        if worker.poll(10):
            heartbeats += split(worker.recv_multipart())[0] == HEARTBEAT
    assert len(broker.table.workers) == 1 and heartbeats >= 8

    robot = _socket(ctx, zmq.DEALER, broker.router_endpoint)
    robot.send_multipart(codec.encode({"type": "ping", "id": 1}))
    pong, _ = codec.decode(_pump(broker, robot))
    assert pong["type"] == "pong" and pong["data"]["model"] == {"config": "x"}
    assert [w["name"] for w in pong["data"]["broker"]["workers"]] == ["w0"]
    assert pong["data"]["server"]["sessions"] == 3

    robot.send_multipart(_infer(7))
    envelope, _ = read_request(_next_command(broker, worker, REQUEST))
    answer = codec.encode({"type": "result", "id": 7, "robot": "arm", "data": {"ok": True}})
    worker.send_multipart(reply_frames(envelope.seq, answer))
    reply, _ = codec.decode(_pump(broker, robot))
    assert reply["data"] == {"ok": True} and broker.table.in_flight() == 0


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        ([b"\xff"], "bad_header"),
        ([msgpack.packb([1, 2])], "bad_header"),
        ([msgpack.packb({"v": 2, "type": "ping"})], "bad_version"),
        ([msgpack.packb({"v": 1, "type": "rm -rf", "id": 3})], "unknown_type"),
        ([msgpack.packb({"v": 1, "type": "infer", "id": 4, "robot": "@json/1"})], "bad_request"),
        (
            [msgpack.packb({"v": 1, "type": "ping", "arrays": [{"name": "x", "dtype": "<f4", "shape": [2]}]})],
            "bad_frames",
        ),
        ([msgpack.packb({"v": 1, "type": "ping", "id": 5}), b"x" * (2 * 1024 * 1024)], "oversize"),
    ],
)
def test_hostile_front_frames_get_the_servers_typed_errors_and_the_broker_goes_on(broker, ctx, frames, code):
    robot = _socket(ctx, zmq.DEALER, broker.router_endpoint)
    robot.send_multipart(frames)
    reply, _ = codec.decode(_pump(broker, robot))
    assert reply["type"] == "error" and reply["error"]["code"] == code
    robot.send_multipart(codec.encode({"type": "ping", "id": 9}))
    assert codec.decode(_pump(broker, robot))[0]["type"] == "pong"


def test_a_malformed_worker_message_is_dropped(broker, ctx):
    worker = _join(broker, ctx)
    for frames in ([b"junk"], message(READY, b"\xc1"), message(REQUEST), [b"PI05W1", b"\x03", b"short"]):
        worker.send_multipart(frames)
    _until(broker, lambda: broker.errors["worker_protocol"] == 4)
    robot = _socket(ctx, zmq.DEALER, broker.router_endpoint)
    robot.send_multipart(codec.encode({"type": "ping", "id": 1}))
    assert codec.decode(_pump(broker, robot))[0]["type"] == "pong"


def test_subscriptions_reach_every_worker_once_per_topic(broker, ctx):
    """The first subscriber of a topic and the last one leaving reach the workers' XPUBs; a worker
    that connects later is told of every current topic."""
    pub_a = ctx.socket(zmq.XPUB)
    pub_a.setsockopt(zmq.XPUB_VERBOSER, 1)
    pub_a.connect(broker.xsub_endpoint)
    subs = [_socket(ctx, zmq.SUB, broker.pub_endpoints[0]) for _ in range(2)]
    for sub in subs:
        sub.setsockopt(zmq.SUBSCRIBE, b"arm")
    assert _pump(broker, pub_a) == [b"\x01arm"]
    for _ in range(20):
        broker.step(0.01)
    assert not pub_a.poll(0)  # the second subscriber is not news to the worker
    pub_b = ctx.socket(zmq.XPUB)
    pub_b.setsockopt(zmq.XPUB_VERBOSER, 1)
    pub_b.connect(broker.xsub_endpoint)
    assert _pump(broker, pub_b) == [b"\x01arm"]

    pub_a.send_multipart([b"arm", b"refresh"])
    for sub in subs:
        assert _pump(broker, sub) == [b"arm", b"refresh"]
    subs[0].close()
    for _ in range(20):
        broker.step(0.01)
    assert not pub_a.poll(0)
    subs[1].close()
    assert _pump(broker, pub_a) == [b"\x00arm"]


_front_frames = st.lists(st.binary(max_size=300), min_size=1, max_size=4) | st.builds(
    lambda header, extra: [msgpack.packb(header, use_bin_type=True), *extra],
    st.dictionaries(
        st.sampled_from(["v", "type", "id", "robot", "options", "arrays", "ts", "bogus"]),
        st.none()
        | st.integers(-(2**63), 2**64 - 1)
        | st.text(max_size=20)
        | st.lists(st.integers(0, 9), max_size=3)
        | st.binary(max_size=8),
        max_size=6,
    ),
    st.lists(st.binary(max_size=64), max_size=3),
)
_worker_frames = (
    st.lists(st.binary(max_size=300), min_size=1, max_size=4)
    | st.builds(
        lambda command, rest: [PROTOCOL, command, *rest],
        st.sampled_from([READY, REQUEST, REPLY, HEARTBEAT, DISCONNECT, b"\x00", b"\x09", b""]),
        st.lists(st.binary(max_size=80), max_size=4),
    )
    | st.builds(  # well-framed READY and HEARTBEAT maps holding anything
        lambda command, data: [PROTOCOL, command, msgpack.packb(data, use_bin_type=True)],
        st.sampled_from([READY, HEARTBEAT]),
        st.dictionaries(
            st.sampled_from(["sessions", "refreshing", "healthy", "in_flight", "name", "capacity", "info", "via", "x"]),
            st.none()
            | st.booleans()
            | st.integers(-(2**63), 2**64 - 1)
            | st.floats()
            | st.text(max_size=70)
            | st.lists(st.integers(-(2**63), 2**64 - 1), max_size=3)
            | st.dictionaries(st.text(max_size=5), st.integers(-(2**63), 2**64 - 1), max_size=3),
            max_size=6,
        ),
    )
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_front_frames, min_size=1, max_size=5), st.lists(_worker_frames, min_size=1, max_size=5))
def test_random_frames_from_robots_and_workers_never_stop_the_broker(broker, ctx, front, back):
    """Random and half-valid messages on the robots' side and on the workers' side (from a joined
    worker): the broker answers each robot message or drops it, never raises, and answers the next
    well-formed ping."""
    robot = _socket(ctx, zmq.DEALER, broker.router_endpoint)
    worker = _join(broker, ctx, name=f"w{len(broker.table.workers)}")
    try:
        for frames in front:
            robot.send_multipart(frames)
        for frames in back:
            worker.send_multipart(frames)
        for _ in range(len(front) + len(back)):
            broker.step(0.01)
        while robot.poll(50):
            robot.recv_multipart()
        robot.send_multipart(codec.encode({"type": "ping", "id": 7}))
        for _ in range(MAX_STEPS):
            broker.step(0.01)
            if robot.poll(0):
                reply, _ = codec.decode(robot.recv_multipart())
                if reply.get("id") == 7:
                    assert reply["type"] == "pong"
                    break
        else:
            raise AssertionError("no pong after the hostile frames")
    finally:
        worker.send_multipart(message(DISCONNECT))
        broker.step(0.01)
        robot.close()
        worker.close()


# ============================================================================ issue 19: the health path


def test_a_malformed_heartbeat_drops_its_worker_and_ping_still_answers(broker, ctx):
    """One HEARTBEAT saying `{"sessions": "lots"}` used to make every later ping go unanswered (the
    broker summed the workers' figures); now that worker is dropped and told so, and ping answers."""
    liar, honest = _join(broker, ctx, "liar"), _join(broker, ctx, "honest")
    liar.send_multipart(message(HEARTBEAT, payload({"sessions": "lots", "healthy": True})))
    assert _next_command(broker, liar, DISCONNECT) == []
    robot = _socket(ctx, zmq.DEALER, broker.router_endpoint)
    robot.send_multipart(codec.encode({"type": "ping", "id": 1}))
    pong, _ = codec.decode(_pump(broker, robot))
    assert pong["type"] == "pong", pong
    assert [w["name"] for w in pong["data"]["broker"]["workers"]] == ["honest"]
    assert broker.errors["worker_protocol"] == 1
    honest.close()


def _broker_with(tmp_path, clock: VirtualClock, **settings) -> Broker:
    """A bound broker on ipc endpoints under `tmp_path`, without a refresh XPUB, with `settings`."""
    endpoints = {"router_endpoint": f"ipc://{tmp_path}/router", "pub_endpoints": ()}
    b = Broker(
        BrokerSettings(
            **{**endpoints, **settings},
            backend_endpoint=f"ipc://{tmp_path}/back",
            xsub_endpoint=f"ipc://{tmp_path}/xsub",
        ),
        clock=clock,
    )
    b.bind()
    return b


def test_a_request_its_worker_holds_past_the_timeout_is_answered_timeout(tmp_path, ctx):
    """A worker that heartbeats but never replies must not leave a robot waiting forever: the broker
    answers `timeout` itself, and the worker's late reply is dropped."""
    clock = VirtualClock()
    # heartbeat_s: the worker stays alive throughout, only the request is late
    b = _broker_with(tmp_path, clock, heartbeat_s=10.0, request_timeout_s=5.0)
    try:
        worker = _join(b, ctx)
        robot = _socket(ctx, zmq.DEALER, b.router_endpoint)
        robot.send_multipart(_infer(7))
        envelope, _ = read_request(_next_command(b, worker, REQUEST))
        clock.t = 4.9
        for _ in range(20):
            b.step(0.01)
        assert not robot.poll(0)
        clock.t = 5.1
        reply, _ = codec.decode(_pump(b, robot))
        assert reply["type"] == "error" and reply["id"] == 7 and reply["error"]["code"] == "timeout", reply
        # The late reply reaches nobody, and the robot may send again (its request no longer counts).
        worker.send_multipart(reply_frames(envelope.seq, codec.encode({"type": "result", "id": 7, "data": {}})))
        for _ in range(20):
            b.step(0.01)
        assert not robot.poll(0)
        assert b.table.in_flight() == 0 and b.admission.in_flight == 0
    finally:
        b.close()


def test_one_worker_address_cannot_fill_the_worker_table(tmp_path, ctx):
    """62 fake workers used to fill the 64-place table so that a real one was refused: now one key
    (or, without keys, one address) holds at most its share."""
    b = _broker_with(tmp_path, VirtualClock(), router_endpoint=None, max_workers=8, max_workers_per_principal=3)
    try:
        for i in range(3):
            _join(b, ctx, f"fake{i}")
        refused = _socket(ctx, zmq.DEALER, b.backend_endpoint)
        refused.send_multipart(message(READY, payload({"name": "fake3", "capacity": 1024, "info": {}})))
        assert split(_pump(b, refused))[0] == DISCONNECT
        assert sorted(w.name for w in b.table.workers.values()) == ["fake0", "fake1", "fake2"]
    finally:
        b.close()


def test_ping_answers_when_the_in_flight_caps_are_reached(tmp_path, ctx):
    """A health check must answer under load: `ping` is exempt from the in-flight caps."""
    b = _broker_with(tmp_path, VirtualClock(), admission=AdmissionLimits(max_in_flight=4))
    try:
        worker = _join(b, ctx)
        robots = [_socket(ctx, zmq.DEALER, b.router_endpoint) for _ in range(5)]
        for i, robot in enumerate(robots[:4]):
            robot.send_multipart(_infer(i, robot=f"r{i}"))
        _until(b, lambda: b.table.in_flight() == 4)
        robots[4].send_multipart(_infer(9, robot="r9"))
        busy, _ = codec.decode(_pump(b, robots[4]))
        assert busy["error"]["code"] == "busy"
        robots[4].send_multipart(codec.encode({"type": "ping", "id": 10}))
        pong, _ = codec.decode(_pump(b, robots[4]))
        assert pong["type"] == "pong" and pong["data"]["broker"]["in_flight"] == 4
        worker.close()
    finally:
        b.close()
