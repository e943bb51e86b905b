"""The broker's rules without sockets: heartbeat liveness, sticky least-loaded routing, the
broker <-> worker frames. Time is a number the test steps."""

from __future__ import annotations

import msgpack
import pytest

from runtime.fleet.heartbeat import Liveness
from runtime.fleet.protocol import (
    PROTOCOL,
    READY,
    REPLY,
    REQUEST,
    Envelope,
    FleetProtocolError,
    read_payload,
    read_request,
    read_seq,
    reply_frames,
    request_frames,
    split,
)
from runtime.fleet.routing import InFlight, WorkerTable


def test_a_peer_is_dead_only_after_its_misses_and_heartbeats_go_out_once_per_interval():
    live = Liveness.starting(100.0, interval_s=0.5, misses=3)
    assert live.send_due(100.0) and not live.send_due(100.2)
    assert live.send_due(100.5)
    assert not live.dead(101.5)  # exactly 3 intervals of silence: still alive
    assert live.dead(101.51)
    live.heard(101.4)
    assert not live.dead(102.8) and live.dead(102.91)
    # A caller that stalled sends one heartbeat, not one per interval it missed.
    live.heard(110.0)
    assert live.send_due(110.0) and not live.send_due(110.1)
    assert live.until_next(110.1) == pytest.approx(0.4)
    assert live.until_next(111.6) == 0.0  # dead: due at once
    with pytest.raises(ValueError):
        Liveness.starting(0.0, interval_s=0.0)


def _table(workers: int = 2, **kw) -> WorkerTable:
    table = WorkerTable(interval_s=0.5, misses=3, **kw)
    for i in range(workers):
        table.join(f"w{i}".encode(), f"w{i}", 1, {}, now=0.0)
    return table


def test_new_robots_go_to_the_least_loaded_worker_and_stay_there():
    table = _table()
    placed = {robot: table.route(robot).name for robot in ("a", "b", "c", "d")}
    assert sorted(placed.values()) == ["w0", "w0", "w1", "w1"]
    for _ in range(3):
        assert {robot: table.route(robot).name for robot in placed} == placed
    table.leave("a")  # bye: its next request is placed afresh, on the now least-loaded worker
    assert table.route("a").name == placed["a"]


def test_capacity_weighs_the_choice():
    table = WorkerTable()
    table.join(b"big", "big", 3, {}, now=0.0)
    table.join(b"small", "small", 1, {}, now=0.0)
    names = [table.route(f"r{i}").name for i in range(8)]
    assert names.count("big") == 6 and names.count("small") == 2


def test_a_silent_worker_leaves_with_its_robots_and_its_requests_in_flight():
    table = _table()
    robots = {r: table.route(r) for r in ("a", "b", "c", "d")}
    w0 = table.workers[b"w0"]
    w0.in_flight[7] = InFlight(7, False, b"client", 1, "a")
    for t in (0.5, 1.0, 1.5):  # w1 keeps talking, w0 says nothing
        table.heard(b"w1", t)
    assert table.expire(1.5) == []
    (dead,) = table.expire(1.51)
    assert dead is w0 and 7 in dead.in_flight  # the broker answers these 'unavailable'
    assert table.lost == 1 and table.moved == 2
    for robot, worker in robots.items():  # every robot is on the live worker now, and stays
        assert table.route(robot).name == "w1"
        assert worker.name == "w1" or robot in dead.robots
    assert table.replied(b"w0", 7) is None  # a late reply from the presumed-dead worker is dropped


def test_the_robot_table_is_bounded():
    table = _table(max_robots=3)
    for i in range(5):
        table.route(f"r{i}")
    assert sum(len(w.robots) for w in table.workers.values()) == 3
    assert table.placed("r0") is None and table.placed("r4") is not None


def test_the_worker_table_is_bounded():
    table = _table(workers=2, max_workers=2)
    with pytest.raises(OverflowError):
        table.join(b"w2", "w2", 1, {}, now=0.0)


def test_requests_and_replies_round_trip_through_the_envelope():
    body = [b"header", b"array"]
    frames = request_frames(Envelope(2**40, b"\x00robot", True, "K" * 40, "K" * 40), body)
    command, rest = split(frames)
    assert command == REQUEST
    envelope, got = read_request(rest)
    assert envelope == Envelope(2**40, b"\x00robot", True, "K" * 40, "K" * 40) and got == body
    envelope, _ = read_request(split(request_frames(Envelope(1, b"r", False, None), body))[1])
    assert envelope.user is None and not envelope.internal
    assert envelope.principal == "@72"  # none given: the robot's identity, as the server names it
    command, rest = split(reply_frames(5, [b"reply"]))
    assert command == REPLY and read_seq(rest[0]) == 5 and rest[1:] == [b"reply"]


@pytest.mark.parametrize(
    "frames",
    [
        [],
        [b"nope", READY],
        [PROTOCOL, b"\x09"],
        [PROTOCOL, REQUEST, b"short", b"id", b"\x00", b"", b"h"],
        [PROTOCOL, REQUEST, b"\x00" * 8, b"", b"\x00", b"", b"h"],
        [PROTOCOL, REQUEST, b"\x00" * 8, b"id", b"\x00", b"\xff\xfe", b"h"],
        [PROTOCOL, REQUEST, b"\x00" * 8, b"id", b"\x00", b""],
    ],
)
def test_malformed_worker_messages_are_protocol_errors(frames):
    with pytest.raises(FleetProtocolError):
        _, rest = split(frames)
        read_request(rest)


@pytest.mark.parametrize("raw", [b"\xc1", msgpack.packb([1, 2]), b"\x00" * (65 * 1024), msgpack.packb({1: 2})])
def test_malformed_payloads_are_protocol_errors(raw):
    with pytest.raises(FleetProtocolError):
        read_payload([raw])


def test_a_moved_robot_hands_its_refresh_interval_to_its_new_worker_once():
    table = _table()
    assert [table.route(r).name for r in ("a", "b", "c")] == ["w0", "w1", "w0"]
    table.set_refresh("a", 0.5)
    table.set_refresh("c", 0.5)
    table.set_refresh("c", None)  # cleared: nothing to hand on
    assert table.take_refresh("a") is None  # its worker lives: nothing to hand on
    table.remove(b"w0")
    assert table.route("a").name == "w1"
    assert table.take_refresh("a") == 0.5 and table.take_refresh("a") is None
    assert table.take_refresh("c") is None and table.take_refresh("b") is None
    table.set_refresh("a", 0.7)
    table.leave("a")
    table.route("a")
    assert table.take_refresh("a") is None
