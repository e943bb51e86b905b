"""A virtual clock for asyncio code that takes `clock` and `sleep`: time moves only when the test
says so, so cadence and expiry are checked by counting events, never by waiting on a busy CPU."""

from __future__ import annotations

import asyncio
import heapq
import itertools


class VirtualClock:
    def __init__(self, start: float = 0.0):
        self.now = start
        self._waiters: list[tuple[float, int, asyncio.Future]] = []
        self._order = itertools.count()

    def time(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (self.now + max(0.0, seconds), next(self._order), future))
        await future

    async def _settle(self) -> None:
        """Lets every task that can run, run (a bounded number of loop turns)."""
        for _ in range(20):
            await asyncio.sleep(0)

    async def advance(self, seconds: float) -> None:
        """Moves time forward by `seconds`, waking each sleeper at its own time, in order."""
        until = self.now + seconds
        await self._settle()
        while self._waiters and self._waiters[0][0] <= until:
            when, _, future = heapq.heappop(self._waiters)
            self.now = max(self.now, when)
            if not future.done():
                future.set_result(None)
            await self._settle()
        self.now = until
        await self._settle()
