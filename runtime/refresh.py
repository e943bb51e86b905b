"""Periodic subtask refreshes, per session, off the action path.

Each session with an interval gets a drift-free ticker on the loop's monotonic clock. A tick
starts one generation (through the engine's batcher, like any request) unless the previous one is
still running: then the tick is skipped and counted, never queued, so a slow model never builds a
backlog and an action request waits at most one batch for a refresh.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)

Generate = Callable[[str], Awaitable[dict[str, Any] | None]]
Publish = Callable[[str, dict[str, Any]], Awaitable[None]]


@dataclasses.dataclass
class RefreshState:
    interval_s: float
    refresh_count: int = 0
    skipped: int = 0
    failures: int = 0
    last: dict[str, Any] | None = None
    task: asyncio.Task | None = None


class RefreshScheduler:
    """`generate(key)` makes a subtask from the session's latest observation (None: nothing to
    refresh from yet); `publish(key, message)` delivers it."""

    def __init__(self, generate: Generate, publish: Publish):
        self._generate = generate
        self._publish = publish
        self._states: dict[str, RefreshState] = {}
        self._last: dict[str, dict[str, Any]] = {}
        self._seq = 0
        self.epoch = time.time()

    def interval(self, key: str) -> float | None:
        state = self._states.get(key)
        return state.interval_s if state else None

    def state(self, key: str) -> RefreshState | None:
        return self._states.get(key)

    def last(self, key: str) -> dict[str, Any] | None:
        """The last refresh published for `key`, even after its interval was cleared."""
        return self._last.get(key)

    def set(self, key: str, interval_s: float | None) -> None:
        """Starts, changes (restarting the ticker) or, with None, clears the refresh of `key`."""
        old = self._states.pop(key, None)
        if old is not None and old.task is not None:
            old.task.cancel()
        if interval_s is None:
            return
        if interval_s <= 0:
            raise ValueError(f"refresh interval must be > 0 seconds, got {interval_s}")
        state = RefreshState(interval_s, refresh_count=old.refresh_count if old else 0)
        state.task = asyncio.create_task(self._tick(key, state), name=f"refresh-{key}")
        self._states[key] = state

    def forget(self, key: str) -> None:
        """Clears the refresh and the last value (the session is gone)."""
        self.set(key, None)
        self._last.pop(key, None)

    async def close(self) -> None:
        tasks = [s.task for s in self._states.values() if s.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._states.clear()

    async def _tick(self, key: str, state: RefreshState) -> None:
        loop = asyncio.get_running_loop()
        next_tick = loop.time() + state.interval_s
        running: asyncio.Task | None = None
        try:
            while True:
                await asyncio.sleep(max(0.0, next_tick - loop.time()))
                if running is not None and not running.done():
                    state.skipped += 1
                else:
                    running = asyncio.create_task(self._refresh(key, state))
                next_tick += state.interval_s
                behind = loop.time() - next_tick
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
            log.warning("subtask refresh of %s failed: %s", key, e)
            return
        if result is None:
            return
        state.refresh_count += 1
        self._seq += 1
        message = {
            "type": "subtask_refresh",
            "robot": key,
            "subtask": result["subtask"],
            "subtask_tokens": list(result["subtask_tokens"]),
            "refresh_count": state.refresh_count,
            "timestamp": time.time(),
            "seq": self._seq,
            "epoch": self.epoch,
        }
        state.last = self._last[key] = message
        await self._publish(key, message)
