"""Waiting on a live server by counting, not by sleeping a guessed time."""

from __future__ import annotations

import time
from collections.abc import Callable


def eventually(condition: Callable[[], bool], timeout_s: float = 60.0, step_s: float = 0.02) -> bool:
    """Whether `condition()` becomes true within `timeout_s`, checked every `step_s`.

    The timeout is a deadline for failing, never a budget a passing run spends: a test asserts the
    result, so a slow runner only makes a passing run longer.
    """
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(step_s)
    return True
