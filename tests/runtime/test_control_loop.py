"""The control loop's logic on a simulated clock: scheduling, chunk alignment, underruns,
pipelining, outages, refresh registration and signing off, each counted step by step.

The loop runs unchanged; its clock, its sleep, its robot and its client are simulated. The
simulated server answers each chunk request a fixed latency after it was sent, unless it is down at
any moment in between; a chunk computed from the observation of step s plans the value s + i for
step s + i, so a loop that aligns chunks correctly executes, at every step, that step's number.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from runtime.robot.control_loop import LoopStatus
from runtime.robot.virtual_time import VirtualClock
from tests.support.simulated_loop import HZ, PERIOD, SAFE, START_S, CountingRobot, SimServer, simulated_loop
from transport.errors import RequestTimeout


def test_ticks_follow_the_clock_without_drift_and_catch_up_after_a_stall():
    clock = VirtualClock(START_S)
    # Every act takes 7 ms; the act of tick 40 takes 70 ms: ticks 41 to 44 then run back to back
    # (7 ms each) until tick 45 is on schedule again.
    robot = CountingRobot(clock, {k: 0.007 for k in range(150)} | {40: 0.07})
    summary = simulated_loop(SimServer(clock, 0.05), robot, buffer={"request_when_left": 20}).run(3.0)
    assert summary["ticks"] == 150 and len(robot.times) == 150
    late = np.asarray(robot.times) - (robot.times[0] + np.arange(150) * PERIOD)
    on_time = [k for k in range(150) if k not in (41, 42, 43, 44)]
    assert np.abs(late[on_time]).max() < 2e-4  # sleep(period) would drift 7 ms a tick
    np.testing.assert_allclose(late[41:45], [0.05, 0.037, 0.024, 0.011], atol=2e-4)
    assert summary["jitter_ms_p50"] < 0.2 and summary["achieved_hz"] == pytest.approx(HZ, rel=1e-3)


def test_each_chunk_is_executed_at_the_steps_it_was_planned_for():
    clock = VirtualClock(START_S)
    robot = CountingRobot(clock)
    loop = simulated_loop(SimServer(clock, 0.13), robot, buffer={"request_when_left": 20})
    summary = loop.run(4.0)
    assert summary["underruns"] == 0 and summary["chunks_received"] >= 5
    np.testing.assert_array_equal(robot.values(), np.arange(200))  # every step ran its own planned action
    # Observed after acting on step s-1, answered 6.5 periods later: merged before step s + 6.
    assert loop.buffer.metrics.delays_steps[1:] == [6] * (summary["chunks_received"] - 1)
    assert all(130 <= d < 130 + PERIOD * 1e3 for d in loop.buffer.metrics.delays_ms[1:])


@pytest.mark.parametrize(("blend", "largest_step"), [("replace", 11.0), ("crossfade", 1 + 10 / 9)])
def test_a_crossfade_spreads_a_change_of_plan_over_its_steps(blend, largest_step):
    clock = VirtualClock(START_S)
    robot = CountingRobot(clock)
    # Each chunk plans 10 more than the last one at the same step: a jump of 10 where they meet,
    # spread by the crossfade over 8 steps (plus the plan's own step of 1).
    server = SimServer(clock, 0.13, shift=10.0)
    loop = simulated_loop(server, robot, buffer={"request_when_left": 20, "blend": blend, "crossfade_steps": 8})
    summary = loop.run(4.0)
    assert summary["underruns"] == 0 and summary["chunks_received"] >= 5
    assert np.diff(robot.values()).max() == pytest.approx(largest_step)


def test_underruns_are_counted_exactly_hold_the_safe_action_and_teach_the_trigger():
    clock = VirtualClock(START_S)
    robot = CountingRobot(clock)
    # 24.5 periods of latency; before any delay is measured the request goes at the floor of 10
    # actions left (step 40), its chunk merges before step 64: steps 50..63 run without a plan.
    # That delay of 24 steps then sets the trigger to 24 + 2 (the margin), as many as a chunk holds:
    # every later request goes with 26 left, its chunk lands with 2 to spare, and nothing starves.
    loop = simulated_loop(SimServer(clock, 0.49), robot, buffer={"request_when_left": 10}, max_in_flight=1)
    summary = loop.run(4.0)
    starved = [step for step, a in enumerate(robot.actions) if tuple(a) == SAFE]
    assert starved == list(range(50, 64))
    assert summary["underruns"] == 14
    assert loop.buffer.metrics.delays_steps[1:] == [24] * (summary["chunks_received"] - 1)
    assert loop.buffer.request_trigger() == 26
    fed = [s for s in range(200) if s not in starved]
    np.testing.assert_array_equal(robot.values()[fed], fed)


@pytest.mark.parametrize(
    ("blend", "left_when_asked"), [("replace", 23), ("crossfade", 23), ("average", 23), ("rtc", 25)]
)
def test_the_loop_learns_when_to_ask_in_every_blend_mode(blend, left_when_asked):
    clock = VirtualClock(START_S)
    robot = CountingRobot(clock)
    # 21.5 periods of latency: chunks merge 21 steps after their observation. With a floor of 0 the
    # first request after the warm-up chunk goes when the plan runs out (rtc: after s = 25 steps);
    # from then on the trigger is 21 + 2 (rtc: s = 25 <= H - 23 leaves 25).
    server = SimServer(clock, 0.43)
    depth_at: dict[int, int] = {}
    loop = simulated_loop(
        server,
        robot,
        on_tick=lambda st: depth_at.setdefault(st.step, st.depth),
        buffer={"request_when_left": 0, "blend": blend},
    )
    summary = loop.run(6.0)
    assert loop.buffer.metrics.delays_steps[1:] == [21] * (summary["chunks_received"] - 1)
    learnt = [r for r in server.requests[2:] if r.answered is not None]
    assert len(learnt) >= 8
    # The plan held this many actions from the request's observation step on: the chunk lands with 2 to spare.
    assert {depth_at[r.obs_step] for r in learnt} == {left_when_asked}
    starved = np.flatnonzero(robot.values() == SAFE[0])
    assert starved.tolist() == ([] if blend == "rtc" else list(range(50, 71)))
    # One request at a time: each is sent after the one before was answered.
    assert all(r.answered <= q.sent for r, q in zip(server.requests, server.requests[1:], strict=False))


@pytest.mark.parametrize(("in_flight", "starved"), [(1, True), (2, False)])
def test_pipelined_requests_cover_a_latency_beyond_the_chunk_slack(in_flight, starved):
    clock = VirtualClock(START_S)
    robot = CountingRobot(clock)
    # 29.5 periods of latency, asked for at 40 actions left: a request sent when the previous one
    # arrives comes too late (the plan ends 10 steps after it was asked for); two in flight do not.
    server = SimServer(clock, 0.59)
    summary = simulated_loop(server, robot, buffer={"request_when_left": 40}, max_in_flight=in_flight).run(4.0)
    assert (summary["underruns"] > 0) is starved
    concurrent_max = max(
        sum(1 for r in server.requests if r.sent <= q.sent < (r.answered or math.inf)) for q in server.requests
    )
    assert concurrent_max == in_flight


def test_an_outage_holds_the_safe_action_is_counted_and_ends_with_the_next_chunk():
    clock = VirtualClock(START_S)
    robot = CountingRobot(clock)
    start = clock()
    server = SimServer(clock, 0.1, down=(start + 1.0, start + 3.0))
    statuses: list[LoopStatus] = []
    loop = simulated_loop(
        server,
        robot,
        on_tick=lambda st: statuses.append(dataclasses.replace(st)),
        buffer={"request_when_left": 20},
        request_timeout_s=0.5,
    )
    summary = loop.run(5.0)
    failed = [r for r in server.requests if r.answered is None and not r.future.cancelled()]
    assert failed and all(r.timeout_s == 0.5 and r.retries == 0 for r in server.requests[1:])
    first_failed = failed[0]
    back = next(r for r in server.requests if r.answered is not None and r.sent > first_failed.sent)
    assert back.answered >= start + 3.0  # the next chunk is the first one after the restart
    assert summary["outages"] == 1
    assert summary["outage_s"] == pytest.approx(back.answered - first_failed.sent, abs=PERIOD + 1e-3)
    # The safe action from the end of the plan to the first chunk after the restart, then the plan again.
    values = robot.values()
    starved = np.flatnonzero(values == SAFE[0])
    assert starved.size > 0 and np.array_equal(starved, np.arange(starved[0], starved[-1] + 1))
    resumed = starved[-1] + 1
    assert robot.times[resumed] >= back.answered > robot.times[starved[-1]]
    np.testing.assert_array_equal(values[resumed:], np.arange(resumed, len(values)))
    assert summary["underruns"] == starved.size
    # The status shows the outage while it lasts, and its duration after.
    in_outage = [st.step for st in statuses if st.in_outage]
    assert in_outage and statuses[-1].outages == 1 and not statuses[-1].in_outage
    assert statuses[-1].outage_s == pytest.approx(summary["outage_s"])
    assert [st.outage_s for st in statuses] == sorted(st.outage_s for st in statuses)


def test_a_malformed_reply_is_a_counted_error_and_the_loop_goes_on():
    clock = VirtualClock(START_S)
    robot = CountingRobot(clock)
    server = SimServer(clock, 0.1)
    server.broken_replies = {2, 3}
    summary = simulated_loop(server, robot, buffer={"request_when_left": 20}).run(3.0)
    assert summary["request_errors"] == 2 and summary["outages"] == 0
    assert summary["chunks_received"] == len([r for r in server.requests if r.answered is not None]) - 2
    assert robot.values()[-1] == 149  # back on plan


def test_refresh_mode_registers_with_every_request_and_signs_off_at_the_end():
    clock = VirtualClock(START_S)
    server = SimServer(clock, 0.1)
    loop = simulated_loop(server, CountingRobot(clock), pub="sim://pub", subtask_mode="refresh", refresh_interval_s=0.5)
    summary = loop.run(3.0)
    assert len(server.requests) >= 5
    assert all(r.options["subtask_refresh_interval"] == 0.5 for r in server.requests)
    # Until a subtask is known the server generates one; then requests are conditioned on the latest.
    assert server.requests[0].options["generate_subtask"] is True
    later = server.requests[1:]
    assert all(r.options["generate_subtask"] is False for r in later)
    assert later[-1].options["low_level_prompt"] == f"subtask {server.refreshes}"
    assert summary["subtasks_seen"] == 1 + server.refreshes and summary["refresh_count"] == server.refreshes >= 5
    assert server.calls == [("refresh", None, 1.0, 0), ("bye", 1.0, 0)]


def test_off_mode_sends_no_refresh_interval_and_says_bye():
    clock = VirtualClock(START_S)
    server = SimServer(clock, 0.1)
    simulated_loop(server, CountingRobot(clock)).run(1.0)
    assert all("subtask_refresh_interval" not in r.options for r in server.requests)
    assert all(r.options["generate_subtask"] is False for r in server.requests)
    assert server.calls == [("bye", 1.0, 0)]


def test_a_new_server_epoch_counts_as_one_restart():
    clock = VirtualClock(START_S)
    server = SimServer(clock, 0.1)
    loop = simulated_loop(server, CountingRobot(clock), pub="sim://pub", subtask_mode="refresh", refresh_interval_s=0.3)

    def restart_at_step_60(st: LoopStatus) -> None:
        if st.step == 60:
            server.epoch = 2.0

    loop._on_tick = restart_at_step_60
    summary = loop.run(3.0)
    assert summary["server_restarts"] == 1 and summary["outages"] == 0
    loop._on_refresh({"subtask": "late", "refresh_count": 1, "epoch": 1.0})  # a stale message from before
    assert loop.summary()["server_restarts"] == 1


def test_stop_cancels_requests_in_flight_and_signs_off():
    clock = VirtualClock(START_S)
    server = SimServer(clock, 0.3)
    loop = simulated_loop(server, CountingRobot(clock), buffer={"request_when_left": 45})
    loop._on_tick = lambda st: loop.stop() if st.step == 30 else None
    summary = loop.run()
    assert summary["ticks"] == 30
    assert server.requests[-1].future.cancelled()
    assert server.calls == [("bye", 1.0, 0)]


def test_a_server_that_never_answered_gets_no_goodbye():
    clock = VirtualClock(START_S)
    server = SimServer(clock, 0.1, down=(0.0, math.inf))
    loop = simulated_loop(server, CountingRobot(clock), subtask_mode="refresh", pub="sim://pub")
    with pytest.raises(RequestTimeout):
        loop.run(1.0)
    assert server.calls == [] and loop.ticks == 0


def test_a_first_chunk_answered_unavailable_is_asked_again():
    """A fleet whose worker died under the first request (or with none joined yet) answers
    `unavailable`: the loop asks again instead of failing, and starts once a chunk comes."""
    clock = VirtualClock(START_S)
    server = SimServer(clock, 0.1)
    server.unavailable_first = 2
    loop = simulated_loop(server, CountingRobot(clock), buffer={"request_when_left": 20})
    summary = loop.run(1.0)
    assert summary["ticks"] == 50 and len(server.requests) >= 3
