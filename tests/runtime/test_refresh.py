"""The refresh scheduler's timing rules, on a virtual clock: cadence is counted, not waited for."""

from __future__ import annotations

import asyncio

from policy.request import InferenceResult
from runtime.policy_server.refresh import RefreshScheduler
from runtime.robot.virtual_time import VirtualClock


def _result(text: str) -> InferenceResult:
    return InferenceResult(None, text, (1, 2), None, {})


class _Harness:
    """A scheduler whose generations take `generation_s` of virtual time."""

    def __init__(self, generation_s: float):
        self.clock = VirtualClock()
        self.published: list[dict] = []
        self.calls = 0
        self.generation_s = generation_s
        self.scheduler = RefreshScheduler(self._generate, self._publish, self.clock, self.clock.sleep_async)

    async def _generate(self, key: str) -> InferenceResult:
        self.calls += 1
        await self.clock.sleep_async(self.generation_s)
        return _result(f"step {self.calls}")

    async def _publish(self, key: str, message: dict) -> None:
        self.published.append(message)


def test_fast_generation_refreshes_every_tick():
    async def scenario():
        h = _Harness(generation_s=0.01)
        h.scheduler.set("a", 0.1)
        await h.clock.advance_async(0.55)  # ticks at 0.1 .. 0.5, each done 0.01 later
        state = h.scheduler.state("a")
        await h.scheduler.close()
        return h, state

    h, state = asyncio.run(scenario())
    assert len(h.published) == 5
    assert [m["refresh_count"] for m in h.published] == [1, 2, 3, 4, 5]
    assert [m["subtask"] for m in h.published] == [f"step {i}" for i in range(1, 6)]
    assert state.skipped == 0


def test_slow_generation_skips_ticks_and_never_queues():
    async def scenario():
        h = _Harness(generation_s=0.25)
        h.scheduler.set("a", 0.1)
        await h.clock.advance_async(1.05)  # ticks at 0.1, 0.2, ..., 1.0
        state = h.scheduler.state("a")
        await h.scheduler.close()
        return h, state

    h, state = asyncio.run(scenario())
    # Generations start at 0.1 (done 0.35), 0.4 (0.65), 0.7 (0.95), 1.0: the other six ticks found
    # one running and were skipped, none queued.
    assert h.calls == 4
    assert state.skipped == 6
    assert len(h.published) == 3


def test_same_interval_again_changes_nothing_and_a_new_one_restarts():
    async def scenario():
        h = _Harness(generation_s=0.0)
        s = h.scheduler
        s.set("a", 0.1)
        await h.clock.advance_async(0.15)
        s.set("a", 0.1)  # repeated with every request: the ticker keeps its phase
        await h.clock.advance_async(0.1)
        assert len(h.published) == 2
        s.set("a", 0.5)  # slower now: restarts from here
        await h.clock.advance_async(0.45)
        assert len(h.published) == 2
        await h.clock.advance_async(0.1)
        assert len(h.published) == 3
        s.set("a", None)
        assert s.interval("a") is None and s.active() == 0 and s.last("a") == h.published[-1]
        await h.clock.advance_async(2.0)
        assert len(h.published) == 3
        s.set("a", 0.1)  # re-enabled: the count runs on
        await h.clock.advance_async(0.1)
        await s.close()
        return h

    h = asyncio.run(scenario())
    assert [m["refresh_count"] for m in h.published] == [1, 2, 3, 4]


def test_a_failing_generation_is_counted_and_the_ticker_goes_on():
    async def scenario():
        clock = VirtualClock()
        published: list[dict] = []
        calls = 0

        async def generate(key: str) -> InferenceResult:
            nonlocal calls
            calls += 1
            if calls == 2:
                raise RuntimeError("model fell over")
            return _result("ok")

        async def publish(key: str, message: dict) -> None:
            published.append(message)

        s = RefreshScheduler(generate, publish, clock, clock.sleep_async)
        s.set("a", 1.0)
        await clock.advance_async(3.5)
        state = s.state("a")
        await s.close()
        return state, published

    state, published = asyncio.run(scenario())
    assert state.failures == 1 and len(published) == 2
