"""The action-chunk buffer: latency compensation, blending, underruns, leftovers, all by step counts."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.robot.chunk_buffer import ActionChunkBuffer, BufferSettings


def _chunk(start: float, n: int = 10, dim: int = 2) -> np.ndarray:
    return (start + np.arange(n, dtype=np.float64))[:, None] * np.ones((1, dim))


def test_stale_actions_are_dropped_by_exactly_the_delay():
    buf = ActionChunkBuffer(2, BufferSettings(blend="replace"))
    assert buf.add_chunk(_chunk(100), obs_step=0, now_step=0) == 0
    for step in range(4):
        assert buf.next_action(step)[0] == 100 + step
    # Computed from the observation of step 2, arriving before step 4 runs: actions for 2 and 3 passed.
    assert buf.add_chunk(_chunk(200), obs_step=2, now_step=4) == 2
    assert buf.next_action(4)[0] == 202
    assert buf.metrics.delays_steps == [0, 2]


def test_a_chunk_older_than_its_length_is_stale():
    buf = ActionChunkBuffer(2)
    assert buf.add_chunk(_chunk(0, n=5), obs_step=0, now_step=7) == 5
    assert buf.metrics.stale_chunks == 1 and buf.actions_left(7) == 0


def test_crossfade_blends_linearly_over_k_steps():
    buf = ActionChunkBuffer(1, BufferSettings(blend="crossfade", crossfade_steps=3))
    buf.add_chunk(np.zeros((10, 1)), obs_step=0, now_step=0)
    buf.add_chunk(np.ones((10, 1)), obs_step=2, now_step=2)
    got = [buf.next_action(s)[0] for s in range(2, 8)]
    np.testing.assert_allclose(got, [0.25, 0.5, 0.75, 1, 1, 1])


def test_weighted_average_where_chunks_overlap():
    buf = ActionChunkBuffer(1, BufferSettings(blend="average", average_old_weight=0.3))
    buf.add_chunk(np.zeros((4, 1)), obs_step=0, now_step=0)
    buf.add_chunk(np.ones((6, 1)), obs_step=1, now_step=1)
    got = [buf.next_action(s)[0] for s in range(1, 7)]
    np.testing.assert_allclose(got, [0.7, 0.7, 0.7, 1, 1, 1])  # old covers steps 1..3 only


def test_underrun_holds_the_last_action_or_the_safe_one():
    buf = ActionChunkBuffer(2)
    np.testing.assert_array_equal(buf.next_action(0), [0, 0])  # nothing yet: zeros
    buf.add_chunk(_chunk(5, n=2), obs_step=1, now_step=1)
    buf.next_action(1), buf.next_action(2)
    np.testing.assert_array_equal(buf.next_action(3), [6, 6])
    assert buf.metrics.underruns == 2
    safe = ActionChunkBuffer(2, BufferSettings(safe_action=(9.0, -9.0)))
    np.testing.assert_array_equal(safe.next_action(0), [9, -9])


def test_requests_when_the_threshold_is_reached_and_keeps_the_leftover():
    buf = ActionChunkBuffer(2, BufferSettings(request_when_left=3))
    buf.add_chunk(_chunk(0, dim=32), obs_step=0, now_step=0)
    assert not buf.needs_chunk(6) and buf.needs_chunk(7)
    left = buf.leftover(7)
    # The leftover keeps the server's every column; the robot gets its own first two.
    assert left.start_step == 7 and left.actions[:, 0].tolist() == [7, 8, 9] and left.actions.shape == (3, 32)
    assert buf.next_action(7).shape == (2,)
    assert buf.chunk_age(7) == 7


def test_requests_in_flight_count_as_coverage():
    buf = ActionChunkBuffer(2, BufferSettings(request_when_left=10))
    buf.add_chunk(_chunk(0, n=50), obs_step=0, now_step=0)
    assert not buf.needs_chunk(39) and buf.needs_chunk(40)
    # A request from the observation of step 30 will cover up to step 80 (the horizon seen is 50).
    assert not buf.needs_chunk(40, [30]) and not buf.needs_chunk(69, [30]) and buf.needs_chunk(70, [30])
    assert buf.needs_chunk(80, [30, 20])


def test_a_chunk_older_than_the_plan_is_dropped():
    buf = ActionChunkBuffer(1, BufferSettings(blend="replace"))
    buf.add_chunk(_chunk(0, n=20, dim=1), obs_step=0, now_step=0)
    assert buf.add_chunk(_chunk(100, n=20, dim=1), obs_step=10, now_step=12) == 2
    # Answered later but computed from an earlier observation: the newer plan stays.
    assert buf.add_chunk(_chunk(200, n=20, dim=1), obs_step=5, now_step=13) == 20
    assert buf.metrics.stale_chunks == 1 and buf.next_action(13)[0] == 103
    assert buf.chunk_age(13) == 3


def test_bad_chunks_are_rejected():
    buf = ActionChunkBuffer(2)
    with pytest.raises(ValueError, match=r"\(horizon, at least 2\)"):
        buf.add_chunk(np.zeros((5, 1)), 0, 0)
    with pytest.raises(ValueError, match="before its observation"):
        buf.add_chunk(np.zeros((5, 2)), 3, 1)
    with pytest.raises(ValueError, match="blend must be"):
        BufferSettings(blend="fade")


def _measured(delays: list[int], **settings) -> ActionChunkBuffer:
    """A buffer that has merged 50-step chunks arriving `delays` steps after their observations."""
    buf = ActionChunkBuffer(2, BufferSettings(**settings))
    for k, delay in enumerate(delays):
        buf.add_chunk(_chunk(0, n=50), obs_step=60 * k, now_step=60 * k + delay)
    return buf


@pytest.mark.parametrize("blend", ["replace", "crossfade", "average", "rtc"])
def test_the_first_chunks_delay_is_left_out_and_the_floor_rules_until_one_is_measured(blend):
    # The first chunk carries the server's compilation: 40 steps here, which would ask for 42.
    buf = _measured([40], blend=blend, request_when_left=5)
    assert buf.delay_estimate() is None and buf.request_trigger() == 5
    buf.add_chunk(_chunk(0, n=50), obs_step=100, now_step=108)
    assert buf.delay_estimate() == 8 and buf.request_trigger() == 8 + 2


@pytest.mark.parametrize(
    ("floor", "delays", "trigger"),
    [
        (0, [0, 12, 9, 11], 14),  # the largest recent delay plus the margin of 2
        (30, [0, 12], 30),  # the floor asks earlier than the delays need
        (0, [0, 30], 32),
    ],
)
def test_the_trigger_is_the_delay_plus_a_margin_never_below_the_floor(floor, delays, trigger):
    assert _measured(delays, request_when_left=floor).request_trigger() == trigger


@pytest.mark.parametrize(("floor", "overlaps"), [(0, False), (40, True)])
def test_past_h_minus_d_it_asks_as_each_chunk_lands_and_only_the_floor_overlaps_requests(floor, overlaps):
    buf = _measured([0, 30], request_when_left=floor)
    # Landed 30 steps late, the chunk holds 20 actions: fewer than the 32 asked for, so ask now...
    assert buf.add_chunk(_chunk(0, n=50), obs_step=200, now_step=230) == 30
    assert buf.actions_left(230) == 20 and buf.needs_chunk(230)
    # ...and not again while that request computes: a second one would queue behind it. The floor of
    # 40 does ask again once the one in flight will leave 40 (at step 240), as it always did.
    assert buf.needs_chunk(240, [230]) is overlaps and not buf.needs_chunk(239, [230])


def test_a_slow_reply_raises_the_trigger_until_it_leaves_the_window():
    buf = _measured([0, 5, 5, 5], request_when_left=0)  # the default window: the last 20 delays
    assert buf.request_trigger() == 7
    buf.add_chunk(_chunk(0, n=50), obs_step=300, now_step=320)
    assert buf.request_trigger() == 22
    for k in range(19):
        buf.add_chunk(_chunk(0, n=50), obs_step=400 + 60 * k, now_step=405 + 60 * k)
        assert buf.request_trigger() == 22
    buf.add_chunk(_chunk(0, n=50), obs_step=2000, now_step=2005)
    assert buf.request_trigger() == 7


@pytest.mark.parametrize("blend", ["replace", "crossfade", "average"])
def test_the_request_goes_out_with_the_delay_and_its_margin_left(blend):
    buf = _measured([0, 12], blend=blend, request_when_left=0)
    buf.add_chunk(_chunk(0, n=50), obs_step=200, now_step=212)  # the plan covers steps 212..249
    assert not buf.needs_chunk(235) and buf.needs_chunk(236)  # 14 = 12 + 2 left at step 236
    assert buf.actions_left(236) == 14


def test_delay_settings_are_checked():
    for bad in ({"delay_window": 0}, {"delay_percentile": 101.0}, {"warmup_chunks": -1}, {"request_margin": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            BufferSettings(**bad)
