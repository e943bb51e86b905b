"""A control loop on virtual time, against a real server, with the inference latency injected.

Evaluations that must not depend on the CPU they run on (the chunk-smoothness benchmark, the
demo policy's test, `robots.eval --virtual-time`) run the real loop, the real client and the real
server, but the loop's clock moves only when the loop sleeps, and a reply reaches the loop exactly
`latency_steps` control steps after its observation however long the model took: a 2-core CI
runner and a GPU host see the same episode.

`VirtualClock` is also the one manual clock of the tests: the code under test takes a clock (and a
sleep) as arguments, and the test moves this one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import heapq
import itertools
from typing import Any

import numpy as np

from robots.sim import SimArm
from transport.zmq_client import PolicyClient


class VirtualClock:
    """Monotonic seconds that move only when code or a test moves them, so anything timed (a control
    loop's cadence, an expiry, a heartbeat, a refresh ticker) is checked by counting, never by waiting
    on a CPU whose speed varies.

    It is the clock (`clock()`), and time moves in one of three ways:
    - `sleep(dt)`: the caller moves time itself, by at least 10 us a call so a spin-wait ends (the
      control loop on virtual time, whose clock moves only when the loop sleeps);
    - `advance(dt)` or setting `t`: a test moves time between the steps it drives;
    - `await advance_async(dt)`: a test moves time for asyncio tasks that `await sleep_async(dt)`,
      waking each at its own time, in order, and letting the tasks run before time moves on.
    """

    def __init__(self, start: float = 0.0) -> None:
        self.t = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()  # sleepers due at the same time wake in the order they slept

    def __call__(self) -> float:
        return self.t

    def sleep(self, dt: float) -> None:
        self.t += max(dt, 1e-5)

    def advance(self, dt: float) -> None:
        self.t += dt

    async def sleep_async(self, dt: float) -> None:
        """Returns once `advance_async` has moved time `dt` past now."""
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.t + max(0.0, dt), next(self._order), woken))
        await woken

    async def advance_async(self, dt: float) -> None:
        until = self.t + dt
        await _settle()
        while self._sleepers and self._sleepers[0][0] <= until:
            when, _, woken = heapq.heappop(self._sleepers)
            self.t = max(self.t, when)
            if not woken.done():
                woken.set_result(None)
            await _settle()
        self.t = until
        await _settle()


async def _settle() -> None:
    """Lets every task that can run, run, before virtual time moves on (a bounded number of turns:
    a task that never blocks must not hang the test)."""
    for _ in range(20):
        await asyncio.sleep(0)


@dataclasses.dataclass
class Chunk:
    obs_step: int
    actions: np.ndarray
    arrival_step: int | None = None


class InjectedLatency:
    """The loop's client: a real `PolicyClient`, whose replies the loop sees `latency_steps` steps
    after the observation on the virtual clock. The real request runs to completion when it is
    sent (virtual time stands still meanwhile), so the CPU's speed changes nothing."""

    def __init__(self, client: PolicyClient, arm: SimArm, clock: VirtualClock, latency_steps: int, hz: float):
        self.client = client
        self.arm = arm
        self.clock = clock
        self.latency_s = (latency_steps + 0.5) / hz
        self.seeds = itertools.count(1)
        self.chunks: list[Chunk] = []
        self.requests: list[dict[str, Any]] = []  # the options each request carried (leftover left out)
        self._waiting: list[tuple[float, concurrent.futures.Future, Chunk, Any]] = []

    def start_infer(self, images, high_level_prompt, state=None, timestamp=None, *, timeout_s=None, retries=None, **o):
        self.requests.append({k: v for k, v in o.items() if k != "prev_actions"})
        real = self.client.start_infer(images, high_level_prompt, state, timestamp, seed=next(self.seeds), **o)
        try:
            outcome: Any = self.client.wait(real)
        except Exception as e:  # delivered to the loop as the request's error, on time
            outcome = e
        chunk = Chunk(self.arm.steps, np.asarray(outcome["actions"]) if isinstance(outcome, dict) else np.zeros(0))
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._waiting.append((self.clock() + self.latency_s, future, chunk, outcome))
        return future

    def poll(self, timeout_s: float = 0.0) -> None:
        for item in [w for w in self._waiting if w[0] <= self.clock()]:
            self._waiting.remove(item)
            _, future, chunk, outcome = item
            if isinstance(outcome, Exception):
                future.set_exception(outcome)
                continue
            chunk.arrival_step = self.arm.steps  # polled at the start of a tick, before its action
            self.chunks.append(chunk)
            future.set_result(outcome)

    def wait(self, future: concurrent.futures.Future) -> dict[str, Any]:
        while not future.done():
            self.clock.sleep(min(w[0] for w in self._waiting) - self.clock())
            self.poll()
        return future.result()

    def bye(self, *, timeout_s=None, retries=None) -> dict[str, Any]:
        """The loop signs off when it stops (the bench runs without subtask refreshes)."""
        return self.client.bye()
