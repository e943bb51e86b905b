"""The request paths' multipart send and receive (`transport.zmq_frames`) keep pyzmq's semantics."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import zmq

from transport.zmq_frames import NOBLOCK, readable, recv_frames, send_frames

_ids = itertools.count()


@pytest.fixture
def pair():
    ctx = zmq.Context()
    endpoint = f"inproc://frames-{next(_ids)}"
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.bind(endpoint)
    b.connect(endpoint)
    yield a, b
    a.close(linger=0)
    b.close(linger=0)
    ctx.term()


def test_a_message_arrives_whole_in_order_as_frames(pair):
    a, b = pair
    image = np.arange(300_000, dtype=np.uint8)  # lent to libzmq with copy=False (above the threshold)
    parts = [b"header", b"", memoryview(image), zmq.Frame(b"last")]
    send_frames(a, parts, copy=False)
    send_frames(a, [b"next"])
    frames = recv_frames(b)
    assert all(isinstance(f, zmq.Frame) for f in frames)
    assert [f.bytes for f in frames] == [b"header", b"", image.tobytes(), b"last"]
    assert [f.bytes for f in recv_frames(b)] == [b"next"]  # the first message ended at its last frame


def test_readable_and_noblock_say_whether_a_message_waits(pair):
    a, b = pair
    assert not readable(b)
    with pytest.raises(zmq.Again):
        recv_frames(b, NOBLOCK)
    send_frames(a, [b"x", b"y"])
    assert readable(b)
    assert [f.bytes for f in recv_frames(b, NOBLOCK)] == [b"x", b"y"]
    assert not readable(b)


def test_messages_refused_at_the_high_water_mark_leave_no_part_behind():
    ctx = zmq.Context()
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    try:
        for sock, option in ((push, zmq.SNDHWM), (pull, zmq.RCVHWM)):
            sock.setsockopt(option, 2)
            sock.setsockopt(zmq.LINGER, 0)
        pull.bind(f"inproc://hwm-{next(_ids)}")
        push.connect(pull.getsockopt_string(zmq.LAST_ENDPOINT))
        sent = 0
        with pytest.raises(zmq.Again):
            for _ in range(1000):
                send_frames(push, [b"%d" % sent, b"b", b"c"], NOBLOCK)
                sent += 1
        assert 0 < sent < 1000
        received = []
        while readable(pull):
            received.append([f.bytes for f in recv_frames(pull, NOBLOCK)])
        # Every message that went out arrived whole, and the refused ones left nothing.
        assert received == [[b"%d" % i, b"b", b"c"] for i in range(sent)]
        push.setsockopt(zmq.SNDTIMEO, 10_000)  # the room the reader made reaches the writer as a command
        send_frames(push, [b"again", b"whole"])
        assert [f.bytes for f in recv_frames(pull)] == [b"again", b"whole"]
    finally:
        push.close(linger=0)
        pull.close(linger=0)
        ctx.term()
