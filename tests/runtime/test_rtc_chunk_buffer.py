"""The buffer's and the control loop's real-time chunking mode, by step counts: the delay estimate
(warm-up left out; every mode's request trigger shares it), the execution horizon's bounds, the
arrival step math and the leftover's alignment with the request's observation step."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.robot.chunk_buffer import ActionChunkBuffer, BufferSettings
from runtime.robot.virtual_time import VirtualClock
from tests.support.simulated_loop import HORIZON, START_S, CountingRobot, SimServer, simulated_loop


def _chunk(start: float, n: int = 50, dim: int = 3) -> np.ndarray:
    """Plans the value start + i for its row i, in every column."""
    return (start + np.arange(n, dtype=np.float64))[:, None] * np.ones((1, dim))


def _rtc(**settings) -> ActionChunkBuffer:
    return ActionChunkBuffer(2, BufferSettings(blend="rtc", **settings))


def _arrive(buf: ActionChunkBuffer, obs_step: int, delay: int) -> None:
    buf.add_chunk(_chunk(obs_step), obs_step=obs_step, now_step=obs_step + delay)


def test_the_delay_is_a_high_percentile_of_the_measured_ones_with_the_warm_up_left_out():
    buf = _rtc(warmup_chunks=1, delay_percentile=90.0)
    assert buf.inference_delay() == 0  # nothing measured yet
    _arrive(buf, 0, 24)  # the first chunk: compilation, connection set-up
    assert buf.inference_delay() == 0
    for k, delay in enumerate([5, 6, 5, 7, 5, 6, 5, 5, 6, 9]):
        _arrive(buf, 10 * (k + 1), delay)
    # The 90th percentile of the ten delays is 7.2 steps: the next chunk is assumed 8 steps late.
    assert buf.inference_delay() == 8
    assert buf.metrics.delays_steps[0] == 24  # still reported, just not estimated from


def test_the_delay_looks_at_a_window_of_recent_chunks_and_at_most_half_the_horizon():
    buf = _rtc(warmup_chunks=0, delay_window=3, delay_percentile=100.0)
    for k, delay in enumerate([20, 4, 3, 4]):
        _arrive(buf, 30 * k, delay)
    assert buf.inference_delay() == 4  # the 20 has left the window
    _arrive(buf, 200, 40)  # past half the 50-step horizon: a guided request cannot carry more
    assert buf.inference_delay() == 25


@pytest.mark.parametrize(
    ("wished", "delays", "expected_s"),
    [
        (25, [10], 25),  # within d..H-d
        (5, [10], 10),  # below d: the next request would go out before this one lands
        (45, [10], 38),  # above H - (d + 2): the leftover would not cover the delay and its margin
        (45, [30], 25),  # past H / 2: a guided request carries d = 25 at most, and s <= H - d
        (25, [0], 25),
        (1, [0], 1),
    ],
)
def test_the_execution_horizon_stays_within_d_and_h_minus_the_trigger(wished, delays, expected_s):
    buf = _rtc(warmup_chunks=0, rtc_execute_horizon=wished, request_when_left=0)
    for k, delay in enumerate(delays):
        _arrive(buf, 60 * k, delay)
    d, s = buf.inference_delay(), buf.execute_horizon()
    assert s == expected_s and max(d, 1) <= s <= HORIZON - d


def test_the_floor_shortens_the_execution_horizon():
    buf = _rtc(warmup_chunks=0, rtc_execute_horizon=45, request_when_left=20)
    _arrive(buf, 0, 10)
    # The leftover when asking is H - s: at least the floor of 20, more than the 12 the delay asks.
    assert buf.request_trigger() == 20 and buf.execute_horizon() == 30


def test_requests_go_every_s_steps_and_never_while_one_is_in_flight():
    buf = _rtc(warmup_chunks=0, rtc_execute_horizon=20)
    assert buf.needs_chunk(0)  # no plan yet
    _arrive(buf, 0, 0)
    assert not buf.needs_chunk(19) and buf.needs_chunk(20)
    assert not buf.needs_chunk(20, [20])  # the leftover must be final when it is sent
    _arrive(buf, 20, 6)
    assert not buf.needs_chunk(39) and buf.needs_chunk(40)


def test_a_chunk_is_executed_from_its_arrival_step_unblended():
    buf = _rtc()
    _arrive(buf, 0, 0)
    for step in range(9):
        buf.next_action(step)
    # From the observation of step 3, arriving before step 9 runs: its rows 0..5 have passed.
    assert buf.add_chunk(_chunk(1000), obs_step=3, now_step=9) == 6
    assert [buf.next_action(step)[0] for step in range(9, 13)] == [1006, 1007, 1008, 1009]


def test_the_leftover_starts_at_the_requests_observation_step_in_the_servers_width():
    buf = _rtc(warmup_chunks=0, rtc_execute_horizon=20)
    _arrive(buf, 0, 0)
    _arrive(buf, 20, 7)  # the plan now starts at step 27 with the value 27
    rtc = buf.rtc_inputs(40)
    assert rtc.leftover.start_step == 40 and rtc.leftover.actions.shape == (30, 3)
    np.testing.assert_array_equal(rtc.leftover.actions[:, 0], np.arange(40, 70))
    assert (rtc.inference_delay, rtc.execute_horizon) == (7, 20)
    assert buf.rtc_inputs(70) is None  # nothing left to continue: the request goes unguided
    assert ActionChunkBuffer(2).rtc_inputs(0) is None  # other modes send none


def test_rtc_settings_are_checked():
    for bad in (
        {"rtc_execute_horizon": 0},
        {"rtc_schedule": "cosine"},
        {"rtc_max_guidance_weight": float("nan")},
    ):
        with pytest.raises(ValueError, match="rtc_"):
            BufferSettings(blend="rtc", **bad)


def test_the_control_loop_sends_the_aligned_leftover_every_s_steps():
    clock = VirtualClock(START_S)
    robot = CountingRobot(clock)
    # Answered 6.5 periods after the observation: merged 6 steps after the observation's step.
    server = SimServer(clock, 0.13)
    loop = simulated_loop(server, robot, buffer={"blend": "rtc", "rtc_execute_horizon": 15, "rtc_schedule": "zeros"})
    summary = loop.run(3.0)
    assert summary["underruns"] == 0
    np.testing.assert_array_equal(robot.values(), np.arange(150))  # every step ran its own planned action
    guided = [r for r in server.requests if "prev_actions" in r.options]
    assert len(guided) == len(server.requests) - 1  # all but the first, which has nothing to continue
    assert [r.obs_step for r in server.requests] == list(range(0, 151, 15))  # the last one after tick 149
    for r in guided:
        # Row 0 is the action planned for the request's observation step, in the server's width.
        prev = r.options["prev_actions"]
        np.testing.assert_array_equal(prev[:, 0], r.obs_step + np.arange(len(prev)))
        assert len(prev) == HORIZON - 15 and prev.shape[1] == 2
        assert r.options["execute_horizon"] == 15 and r.options["rtc_schedule"] == "zeros"
    # The first guided request knows no delay yet (the first chunk is the warm-up); then d = 6.
    assert [r.options["inference_delay"] for r in guided] == [0] + [6] * (len(guided) - 1)
