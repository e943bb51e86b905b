"""The refresh scheduler's timing rules, with a generator of known speed."""

from __future__ import annotations

import asyncio

from runtime.refresh import RefreshScheduler


def _run(generation_s: float, interval_s: float, duration_s: float):
    published: list[dict] = []
    calls = 0

    async def generate(key: str):
        nonlocal calls
        calls += 1
        await asyncio.sleep(generation_s)
        return {"subtask": f"step {calls}", "subtask_tokens": [calls]}

    async def publish(key: str, message: dict) -> None:
        published.append(message)

    async def scenario():
        scheduler = RefreshScheduler(generate, publish)
        scheduler.set("a", interval_s)
        await asyncio.sleep(duration_s)
        state = scheduler.state("a")
        await scheduler.close()
        return state

    state = asyncio.run(scenario())
    return state, published, calls


def test_fast_generation_refreshes_every_tick():
    state, published, _ = _run(generation_s=0.01, interval_s=0.1, duration_s=0.55)
    assert 3 <= len(published) <= 6
    assert [m["refresh_count"] for m in published] == list(range(1, len(published) + 1))
    assert state.skipped == 0


def test_slow_generation_skips_ticks_and_never_queues():
    state, published, calls = _run(generation_s=0.25, interval_s=0.1, duration_s=1.05)
    # A generation spans about 2.5 intervals: ticks that find it running are skipped and counted.
    assert calls <= 4
    assert state.skipped >= 5
    assert calls + state.skipped >= 9  # every tick either started a generation or was skipped
    assert len(published) == state.refresh_count


def test_clearing_stops_and_changing_restarts():
    published: list[dict] = []

    async def generate(key: str):
        return {"subtask": key, "subtask_tokens": []}

    async def publish(key: str, message: dict) -> None:
        published.append(message)

    async def scenario():
        s = RefreshScheduler(generate, publish)
        s.set("a", 0.05)
        await asyncio.sleep(0.22)
        s.set("a", 0.5)  # slower now
        n = len(published)
        await asyncio.sleep(0.3)
        assert len(published) == n  # the new interval has not elapsed yet
        s.set("a", None)
        assert s.interval("a") is None and s.last("a") == published[-1]
        await asyncio.sleep(0.6)
        assert len(published) == n
        await s.close()

    asyncio.run(scenario())
    assert published[-1]["refresh_count"] == len(published)
