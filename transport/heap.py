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
    """`freed()` when something large was freed (a subscriber left, a closed connection's queue was
    dropped); `maybe()` hands the free pages back once `interval_s` has passed since the first such
    event: a departing subscriber or a dropped queue is processed one message at a time, and the
    pages are free only once the last is."""

    def __init__(self, interval_s: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.interval_s = interval_s
        self._clock = clock
        self._freed_at: float | None = None
        self.trims = 0

    @property
    def due(self) -> bool:
        return self._freed_at is not None

    def freed(self) -> None:
        if self._freed_at is None:
            self._freed_at = self._clock()

    def maybe(self) -> None:
        if self._freed_at is None or self._clock() - self._freed_at < self.interval_s:
            return
        self._freed_at = None
        trim = _malloc_trim()
        if trim is not None:
            trim(0)
            self.trims += 1
