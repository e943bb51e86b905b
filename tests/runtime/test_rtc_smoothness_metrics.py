"""The chunk-smoothness bench's measures on hand-made chunks: a switch that jumps between two plans
shows in the boundary step, the jerk it adds and the deviation; a chunk that continues the old
plan (what real-time chunking asks for) adds nothing."""

from __future__ import annotations

import numpy as np

from bench.chunk_smoothness import metrics
from runtime.robot.virtual_time import Chunk

STEPS = 20


def _ramp(start: float, n: int = 20) -> np.ndarray:
    return (start + np.arange(n, dtype=np.float64))[:, None]


def _run(second: np.ndarray) -> dict[str, float]:
    """Chunk 1 (observation 0) plans value t for step t; chunk 2, from the observation of step 5,
    lands at step 8 (3 steps of delay) and the arm executes it from there, unblended."""
    first = Chunk(0, _ramp(0), 0)
    other = Chunk(5, second, 8)
    executed = np.concatenate([first.actions[:8], second[3 : 3 + STEPS - 8]])
    return metrics(executed, [first, other], hz=1.0)


def test_a_switch_between_two_plans_is_measured_where_it_happens():
    m = _run(_ramp(5 + 10))  # the new plan is 10 ahead of the old at every step
    assert m["boundary_step_max"] == 11.0  # 7 -> 18: the plan's own step of 1 and the jump of 10
    # A jump of 10 in a ramp: the third differences across it are 10, -20, 10.
    assert m["added_jerk_max"] == 20.0 and m["boundary_jerk_max"] == 20.0
    # Steps 5, 6, 7 ran the old plan while the new one meant 10 more: 30 over the 20 steps.
    assert m["deviation_mean"] == 30 / 20 and m["switches"] == 1


def test_a_chunk_that_continues_the_old_plan_adds_nothing():
    m = _run(_ramp(5))  # the same ramp: what the arm ran is what the new chunk meant
    assert m["boundary_step_max"] == 1.0 and m["added_jerk_max"] == 0.0 and m["deviation_mean"] == 0.0
    assert m["jerk_max"] == 0.0  # a ramp has no jerk of its own
