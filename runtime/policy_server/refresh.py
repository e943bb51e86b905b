"""Periodic subtask refreshes, per session, off the action path.

Each session with an interval gets a drift-free ticker on the loop's monotonic clock. A tick
starts one generation (through the engine's batcher, at refresh priority: behind every robot's
action request) unless the previous one is still running: then the tick is skipped and counted,
never queued, so a slow model never builds a backlog. Setting the interval a session already has
changes nothing, so a robot may repeat it in every request (that is how it re-registers after a
server restart); the refresh count runs on for the session's life, through clears and re-enables.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

from policy.request import InferenceResult

log = logging.getLogger(__name__)

Generate = Callable[[str], Awaitable[InferenceResult | None]]
Publish = Callable[[str, dict[str, Any]], Awaitable[None]]
Sleep = Callable[[float], Awaitable[None]]


@dataclasses.dataclass
class RefreshState:
    interval_s: float
    skipped: int = 0
    failures: int = 0
    last: dict[str, Any] | None = None
    task: asyncio.Task | None = None


class RefreshScheduler:
    """`generate(key)` makes a subtask from the session's latest observation (None: nothing to
    refresh from yet); `publish(key, message)` delivers it. `clock` and `sleep` default to the
    event loop's; tests pass a virtual clock to check the cadence by counting, not by waiting."""

    def __init__(
        self,
        generate: Generate,
        publish: Publish,
        clock: Callable[[], float] | None = None,
        sleep: Sleep = asyncio.sleep,
    ):
        self._generate = generate
        self._publish = publish
        self._clock = clock
        self._sleep = sleep
        self._states: dict[str, RefreshState] = {}
        self._last: dict[str, dict[str, Any]] = {}
        self._counts: dict[str, int] = {}
        self._seq = 0  # refreshes published in all (each message's `seq`)
        self.failed = 0  # refreshes whose generation failed
        self.epoch = time.time()

    def interval(self, key: str) -> float | None:
        state = self._states.get(key)
        return state.interval_s if state else None

    def state(self, key: str) -> RefreshState | None:
        return self._states.get(key)

    def active(self) -> int:
        """How many sessions are refreshing."""
        return len(self._states)

    @property
    def published(self) -> int:
        return self._seq

    def last(self, key: str) -> dict[str, Any] | None:
        """The last refresh published for `key`, even after its interval was cleared."""
        return self._last.get(key)

    def set(self, key: str, interval_s: float | None) -> None:
        """Starts, changes (restarting the ticker) or, with None, clears the refresh of `key`; the
        interval it already has changes nothing."""
        current = self._states.get(key)
        if current is not None and current.interval_s == interval_s:
            return
        if interval_s is not None and not (math.isfinite(interval_s) and interval_s > 0):
            raise ValueError(f"refresh interval must be a finite number of seconds > 0, got {interval_s}")
        old = self._states.pop(key, None)
        if old is not None and old.task is not None:
            old.task.cancel()
        if interval_s is None:
            return
        state = RefreshState(interval_s)
        state.task = asyncio.create_task(self._tick(key, state), name=f"refresh-{key}")
        state.task.add_done_callback(self._log_failure)
        self._states[key] = state

    @staticmethod
    def _log_failure(task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("refresh ticker %r died", task.get_name(), exc_info=task.exception())

    def forget(self, key: str) -> None:
        """Clears the refresh and the last value (the session is gone)."""
        self.set(key, None)
        self._last.pop(key, None)
        self._counts.pop(key, None)

    async def close(self) -> None:
        tasks = [s.task for s in self._states.values() if s.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._states.clear()

    async def _tick(self, key: str, state: RefreshState) -> None:
        now = self._clock or asyncio.get_running_loop().time
        next_tick = now() + state.interval_s
        running: asyncio.Task | None = None
        try:
            while True:
                await self._sleep(max(0.0, next_tick - now()))
                if running is not None and not running.done():
                    state.skipped += 1
                else:
                    running = asyncio.create_task(self._refresh(key, state))
                next_tick += state.interval_s
                behind = now() - next_tick
                if behind > 0:  # the loop itself stalled: skip the ticks that already passed
                    missed = int(behind // state.interval_s) + 1
                    state.skipped += missed
                    next_tick += missed * state.interval_s
        finally:
            if running is not None:
                running.cancel()

    async def _refresh(self, key: str, state: RefreshState) -> None:
        try:
            result = await self._generate(key)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            state.failures += 1
            self.failed += 1
            log.warning("subtask refresh of %r failed: %s", key, e)
            return
        if result is None:
            return
        self._counts[key] = count = self._counts.get(key, 0) + 1
        self._seq += 1
        message = {
            "type": "subtask_refresh",
            "robot": key,
            "subtask": result.subtask,
            "subtask_tokens": [int(t) for t in result.subtask_tokens],
            "refresh_count": count,
            "timestamp": time.time(),
            "seq": self._seq,
            "epoch": self.epoch,
        }
        state.last = self._last[key] = message
        await self._publish(key, message)
