"""Handing memory freed by departed subscribers back to the system.

libzmq's subscription tries are many small allocations; when a subscriber leaves they are freed, but
glibc keeps the pages in its arenas, so the process's resident memory stays at its peak (measured: 20
MB of subscriptions held about 940 MB, and kept it after the subscriber left). `malloc_trim` returns
the free pages, in a few milliseconds. Elsewhere than glibc there is nothing to call.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import time
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


class HeapTrimmer:
    """`freed()` after something large was freed: the free pages go back to the system, at most once
    per `interval_s` (a departing subscriber is reported one subscription at a time)."""

    def __init__(self, interval_s: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self._interval_s = interval_s
        self._clock = clock
        self._last = -float("inf")
        self.trims = 0

    def freed(self) -> None:
        now = self._clock()
        if now - self._last < self._interval_s:
            return
        self._last = now
        trim = _malloc_trim()
        if trim is not None:
            trim(0)
            self.trims += 1
