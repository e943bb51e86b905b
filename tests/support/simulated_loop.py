"""A simulated robot and policy server around the real control loop, on a `VirtualClock`.

The simulated server answers each chunk request a fixed latency after it was sent, unless it is down
at any moment in between; a chunk computed from the observation of step s plans the value s + i for
step s + i, so a loop that aligns chunks correctly executes, at every step, that step's number.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
from typing import Any

import numpy as np

from robots.base import RobotObservation
from runtime.robot.chunk_buffer import BufferSettings
from runtime.robot.control_loop import ControlLoop, LoopSettings
from runtime.robot.virtual_time import VirtualClock
from transport.errors import RemoteError, RequestTimeout

HZ = 50.0
PERIOD = 1.0 / HZ
HORIZON = 50
SAFE = (-1.0, -1.0)
START_S = 1000.0  # the clock starts far from zero, as a monotonic clock does: 0 must not read as "never"


class CountingRobot:
    """Its state is the number of actions it has executed, i.e. the step its observation is for."""

    control_hz = HZ
    action_dim = 2

    def __init__(self, clock: VirtualClock, act_s: dict[int, float] | None = None):
        self.clock = clock
        self.act_s = act_s or {}  # tick -> seconds that tick's act takes
        self.actions: list[np.ndarray] = []
        self.times: list[float] = []

    def observe(self) -> RobotObservation:
        return RobotObservation(
            {"base_0_rgb": np.zeros((4, 4, 3), np.uint8)}, np.array([len(self.actions)], np.float32)
        )

    def act(self, action: np.ndarray) -> None:
        self.times.append(self.clock())
        self.clock.advance(self.act_s.get(len(self.actions), 0.0))
        self.actions.append(np.array(action))

    def reset(self) -> RobotObservation:
        return self.observe()

    def values(self) -> np.ndarray:
        return np.array([a[0] for a in self.actions])


@dataclasses.dataclass
class SimRequest:
    sent: float
    obs_step: int
    options: dict[str, Any]
    timeout_s: float | None
    retries: int | None
    future: concurrent.futures.Future
    answered: float | None = None


class SimServer:
    """The loop's client and the server behind it, on the simulated clock."""

    def __init__(
        self, clock: VirtualClock, latency_s: float, down: tuple[float, float] | None = None, shift: float = 0.0
    ):
        self.clock = clock
        self.latency_s = latency_s
        self.shift = shift  # each chunk answered plans `shift` more than the one before: a model changing its mind
        self.chunks_sent = 0
        self.broken_replies: set[int] = set()  # the numbers (from 1) of the replies that are malformed
        self.unavailable_first = 0  # this many first requests are answered `unavailable` (a fleet between workers)
        self.down = down  # (from, until): absolute simulated times
        self.requests: list[SimRequest] = []
        self.calls: list[tuple] = []  # set_refresh / bye, in order
        self.epoch = 1.0
        self.refresh_every: float | None = None
        self.refresh_callback = None
        self.refreshes = 0
        self._next_refresh = math.inf

    def _up_during(self, start: float, end: float) -> bool:
        return self.down is None or end < self.down[0] or start >= self.down[1]

    def start_infer(self, images, high_level_prompt, state=None, timestamp=None, *, timeout_s=None, retries=None, **o):
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.requests.append(SimRequest(self.clock(), int(state[0]), o, timeout_s, retries, future))
        interval = o.get("subtask_refresh_interval")
        if interval is not None and self.refresh_every is None:
            self.refresh_every = interval
            self._next_refresh = self.clock() + interval
        return future

    def poll(self, timeout_s: float = 0.0) -> None:
        now = self.clock()
        for r in self.requests:
            if r.future.done():
                continue
            ready = r.sent + self.latency_s
            if now >= ready and self.unavailable_first > 0:
                self.unavailable_first -= 1
                r.future.set_exception(RemoteError("policy worker w0 is gone; ask again", "unavailable"))
            elif now >= ready and self._up_during(r.sent, ready):
                r.answered = ready
                offset = self.shift * self.chunks_sent
                self.chunks_sent += 1
                chunk = (offset + r.obs_step + np.arange(HORIZON, dtype=np.float64))[:, None] * np.ones((1, 2))
                if self.chunks_sent in self.broken_replies:
                    chunk = chunk[:, :1]  # too few action dimensions for the robot
                r.future.set_result({"actions": chunk, "subtask": "generated", "epoch": self.epoch})
            elif now >= r.sent + (r.timeout_s or 10.0):
                r.future.set_exception(RequestTimeout(f"no reply within {r.timeout_s} s"))
        if self.refresh_callback is not None and now >= self._next_refresh and self._up_during(now, now):
            self.refreshes += 1
            self._next_refresh += self.refresh_every
            message = {"subtask": f"subtask {self.refreshes}", "refresh_count": self.refreshes, "epoch": self.epoch}
            self.refresh_callback({**message, "seq": self.refreshes})

    def wait(self, future: concurrent.futures.Future) -> dict[str, Any]:
        while not future.done():
            self.clock.sleep(0.001)
            self.poll()
        return future.result()

    def listen_refreshes(self, pub_endpoint, callback) -> None:
        self.refresh_callback = callback

    def set_refresh(self, interval_s, *, timeout_s=None, retries=None) -> dict[str, Any]:
        self.calls.append(("refresh", interval_s, timeout_s, retries))
        return {"subtask_refresh_enabled": interval_s is not None}

    def bye(self, *, timeout_s=None, retries=None) -> dict[str, Any]:
        self.calls.append(("bye", timeout_s, retries))
        return {"dropped": True}


def simulated_loop(
    server: SimServer, robot: CountingRobot, on_tick=None, pub=None, rerun=None, **settings
) -> ControlLoop:
    """The real control loop on `server`'s clock, driving `robot` (and logging to `rerun`, a
    `RobotLog`, if given); `settings` are `LoopSettings` fields (`buffer`: `BufferSettings` fields,
    over a replacing blend and the `SAFE` action)."""
    buffer = BufferSettings(**{"blend": "replace", "safe_action": SAFE, **settings.pop("buffer", {})})
    return ControlLoop(
        robot,
        server,
        LoopSettings(hz=HZ, buffer=buffer, **settings),
        pub_endpoint=pub,
        on_tick=on_tick,
        clock=server.clock,
        sleep=server.clock.sleep,
        rerun=rerun,
    )
