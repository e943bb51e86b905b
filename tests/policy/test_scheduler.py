"""The scheduler's order of work, with an injected clock and no device: actions first, refreshes
behind robots' requests and batched together, deadlines answered, windows respected."""

from __future__ import annotations

import concurrent.futures

import numpy as np
import pytest

from policy.engine.scheduler import ActionBatch, DecodeJob, FollowUp, Scheduler, Segment, StartDecode, Ticket
from policy.request import DeadlineExceeded, EngineError, InferenceRequest, Observation
from runtime.robot.virtual_time import VirtualClock


def _ticket(clock, decodes=False, priority="action", deadline_s=5.0) -> Ticket:
    request = InferenceRequest(Observation({"base_0_rgb": np.zeros((1, 1, 3), np.uint8)}), "go", priority=priority)
    return Ticket(request, 0, clock() + deadline_s, clock(), concurrent.futures.Future(), decodes)


@pytest.fixture
def clock():
    return VirtualClock(100.0)


def _scheduler(clock, capacity=4, window_s=0.0) -> Scheduler:
    return Scheduler(lambda: capacity, window_s, clock)


def test_actions_go_before_the_segments_of_a_refresh_in_flight(clock):
    s = _scheduler(clock)
    refresh = [_ticket(clock, decodes=True, priority="refresh") for _ in range(2)]
    for t in refresh:
        s.put(t)
    start = s.next()
    assert isinstance(start, StartDecode) and start.tickets == refresh and start.priority == "refresh"
    job = DecodeJob("refresh", refresh, 2, rows=None)
    s.decoding(job, "refresh")
    assert isinstance(s.next(), Segment)
    action = _ticket(clock)
    s.put(action)
    assert s.next() == ActionBatch([action])  # between two segments
    assert s.next() == Segment(job)


def test_refreshes_batch_together_behind_robots_subtasks(clock):
    s = _scheduler(clock)
    refreshes = [_ticket(clock, decodes=True, priority="refresh") for _ in range(3)]
    robot = _ticket(clock, decodes=True)
    for t in [*refreshes[:2], robot, refreshes[2]]:
        s.put(t)
    first = s.next()
    assert first == StartDecode([robot], "action")  # the robot's subtask first, alone
    robot_job = DecodeJob("action", [robot], 1, rows=None)
    s.decoding(robot_job, "action")
    assert s.next() == Segment(robot_job)  # robots' decoding continues before any refresh starts
    s.follow_up(robot_job)  # decoded: its actions come next, before refreshes
    assert s.next() == FollowUp(robot_job)
    assert s.next() == StartDecode(refreshes, "refresh")  # the three refreshes in one batch


def test_a_batch_waits_its_window_unless_full(clock):
    s = _scheduler(clock, capacity=2, window_s=0.01)
    a = _ticket(clock)
    s.put(a)
    assert s._choose() == (None, pytest.approx(0.01))  # waits for company
    refresh = _ticket(clock, decodes=True, priority="refresh")
    s.put(refresh)
    assert s._choose()[0] is None  # and the refresh does not take the device meanwhile
    clock.advance(0.01)
    assert s.next() == ActionBatch([a])
    b, c = _ticket(clock), _ticket(clock)
    s.put(b)
    s.put(c)
    assert s.next() == ActionBatch([b, c])  # full: no wait


def test_expired_requests_are_answered_not_run(clock):
    s = _scheduler(clock)
    late, fine = _ticket(clock, deadline_s=1.0), _ticket(clock, deadline_s=10.0)
    s.put(late)
    s.put(fine)
    clock.advance(2.0)
    assert s.next() == ActionBatch([fine])
    with pytest.raises(DeadlineExceeded):
        late.future.result(timeout=0)


def test_close_answers_every_queued_and_decoding_ticket(clock):
    s = _scheduler(clock)
    queued = [_ticket(clock), _ticket(clock, decodes=True), _ticket(clock, decodes=True, priority="refresh")]
    for t in queued:
        s.put(t)
    decoding = _ticket(clock, decodes=True)
    s.decoding(DecodeJob("action", [decoding], 1, rows=None), "action")
    s.close(EngineError("closed", code="unavailable"))
    assert s.next() is None
    for t in [*queued, decoding]:
        with pytest.raises(EngineError) as err:
            t.future.result(timeout=0)
        assert err.value.code == "unavailable"
    late = _ticket(clock)
    s.put(late)  # prepared after the close
    assert late.future.exception(timeout=0).code == "unavailable"


def test_a_batch_waits_for_requests_that_arrived_in_its_window_and_are_still_being_prepared(clock):
    s = _scheduler(clock, capacity=4, window_s=0.01)
    first, second, late = _ticket(clock), None, None
    s.expect(first)
    clock.advance(0.005)
    second = _ticket(clock)  # arrived within the first one's window: its images are still being resized
    s.expect(second)
    s.put(first)
    clock.advance(0.02)  # the window has passed, but `second` arrived inside it
    assert s._choose() == (None, None)  # wait for it (woken when it is put)
    clock.advance(0.02)
    late = _ticket(clock)  # arrived after the window closed: not waited for
    s.expect(late)
    s.put(second)
    assert s._choose() == (ActionBatch([first, second]), None)
    s.put(late)
    clock.advance(0.02)
    assert s._choose() == (ActionBatch([late]), None)


def test_a_request_whose_preparation_failed_is_not_waited_for(clock):
    s = _scheduler(clock, capacity=4, window_s=0.01)
    first, broken = _ticket(clock), _ticket(clock)
    s.expect(first)
    s.expect(broken)
    s.put(first)
    clock.advance(0.02)
    assert s._choose() == (None, None)
    s.unexpect(broken)
    assert s._choose() == (ActionBatch([first]), None)


def test_a_steady_stream_of_actions_delays_a_refresh_but_never_starves_it(clock):
    s = Scheduler(lambda: 4, 0.0, clock, starvation_s=1.0)
    refresh = _ticket(clock, decodes=True, priority="refresh", deadline_s=10.0)
    s.put(refresh)
    turns = []
    for _ in range(30):  # an action batch every 0.125 s (exact in binary), always one waiting
        s.put(_ticket(clock))
        work = s.next()
        turns.append(type(work).__name__)
        if isinstance(work, StartDecode):
            s.decoding(DecodeJob("refresh", work.tickets, 1, rows=None), "refresh")
        clock.advance(0.125)
    # Actions first; once the refresh has waited a second it gets a turn, then a segment a second.
    first = turns.index("StartDecode")
    assert first == 8 and turns[:first] == ["ActionBatch"] * first
    assert [i for i, t in enumerate(turns) if t == "Segment"] == [16, 24]
