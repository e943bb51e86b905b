"""`--demo`: the simulated arm driven through the server's real ZMQ path, with a live status line."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import threading
import time
from typing import TextIO

import numpy as np

from robots.sim import SimArm
from robots.tasks import PickPlaceTask
from runtime.robot.chunk_buffer import BufferSettings
from runtime.robot.control_loop import ControlLoop, LoopSettings, LoopStatus
from transport.errors import TransportError
from transport.zmq_client import PolicyClient

log = logging.getLogger(__name__)


class StatusLine:
    """Rewrites one terminal line at most `rate_hz` times a second."""

    def __init__(self, label: str = "demo", out: TextIO = sys.stderr, rate_hz: float = 4.0):
        self.label = label
        self._out = out
        self._period = 1.0 / rate_hz
        self._last = 0.0

    def __call__(self, st: LoopStatus) -> None:
        now = time.monotonic()
        if now - self._last < self._period:
            return
        self._last = now
        self._out.write(f"\r{format_status(self.label, st)}   ")
        self._out.flush()


def format_status(label: str, st: LoopStatus) -> str:
    """One line: the subtask, chunk latency, buffer depth, loop rate, underruns and outages."""
    delay = "-" if st.last_delay_ms is None else f"{st.last_delay_ms:.0f} ms"
    subtask = (st.subtask or "-")[:48]  # the demo task's longest, with its place, is 44 characters
    service = f"outages {st.outages} ({st.outage_s:.1f} s without service)"
    if st.in_outage:
        service = f"NO SERVER: holding the safe action | {service}"
    return (
        f"[{label}] subtask: {subtask!r} (refresh {st.refresh_count}) | chunk latency {delay} | "
        f"buffer {st.depth:2d} | loop {st.achieved_hz:5.1f} Hz | underruns {st.underruns} | {service}"
    )


@dataclasses.dataclass
class Episodes:
    """The demo's tally: episodes started, and those whose task the simulator judged done."""

    started: int = 0
    succeeded: int = 0


class DemoStatus:
    """The status line of the demo: which model drives the arm, the task, how the episodes went."""

    def __init__(self, line: StatusLine, model: str, episodes: Episodes):
        self._line = line
        self._model = model
        self._episodes = episodes
        self.arm: SimArm | None = None
        self.loop: ControlLoop | None = None

    def __call__(self, st: LoopStatus) -> None:
        arm, ep = self.arm, self._episodes
        if arm is not None and arm.success and self.loop is not None:
            self.loop.stop()  # the task is done: the next episode draws a new scene
        self._line.label = f"{self._model} | episode {ep.started} ({ep.succeeded} done so far)"
        self._line(st)


class Demo:
    """Runs pick-and-place episodes on a thread until `stop()` or `duration_s`; `done` is set at the end.

    Each episode draws a new scene, asks the policy with the scene's prompt ("put the red block on
    the blue plate") and ends when the simulator judges the task done or after `episode_s`; the
    status line says which model drives the arm, so random weights are never mistaken for a policy.
    """

    def __init__(
        self,
        router: str,
        pub: str,
        duration_s: float | None,
        model: str,
        image_size: int,
        episode_s: float = 15.0,
        seed: int = 0,
    ):
        self.done = threading.Event()
        self.summary: dict | None = None
        self.episodes = Episodes()
        self._router, self._pub = router, pub
        self._duration = duration_s
        self._episode_s = episode_s
        self._image_size = image_size
        self._seeds = np.random.SeedSequence(seed)
        self._stopped = threading.Event()
        self._status = DemoStatus(StatusLine(), model, self.episodes)
        self._thread = threading.Thread(target=self._run, name="demo-robot", daemon=True)
        self._thread.start()

    def _episode(self, time_left: float | None) -> dict:
        seed = int(self._seeds.spawn(1)[0].generate_state(1)[0])
        arm = SimArm(image_size=self._image_size, seed=seed, task=PickPlaceTask())
        settings = LoopSettings(
            prompt=arm.prompt,
            hz=50.0,
            buffer=BufferSettings(request_when_left=15, blend="crossfade", safe_action=arm.safe_action),
            subtask_mode="refresh",
            refresh_interval_s=0.5,
            max_decoding_steps=12,
        )
        # Made on the robot's thread, which alone uses it.
        client = PolicyClient(self._router, "demo-sim", timeout_s=30.0)
        try:
            loop = ControlLoop(arm, client, settings, self._pub, on_tick=self._status)
            self._status.arm, self._status.loop = arm, loop
            self.episodes.started += 1
            if self._stopped.is_set():
                return {}
            summary = loop.run(self._episode_s if time_left is None else min(self._episode_s, time_left))
        finally:
            client.close()
        if arm.success:
            self.episodes.succeeded += 1
        return summary

    def _run(self) -> None:
        start = time.monotonic()
        try:
            while not self._stopped.is_set():
                time_left = None if self._duration is None else self._duration - (time.monotonic() - start)
                if time_left is not None and time_left <= 0:
                    break
                self.summary = self._episode(time_left)
            sys.stderr.write("\n")
            log.info(
                "demo: %d of %d episodes done; last episode: %s",
                self.episodes.succeeded,
                self.episodes.started,
                json.dumps(self.summary),
            )
        except TransportError as e:
            log.error("the demo robot stopped: %s", e)
        except Exception:
            log.exception("the demo robot stopped")
        finally:
            self.done.set()

    def stop(self) -> None:
        self._stopped.set()
        loop = self._status.loop
        if loop is not None:
            loop.stop()
        self._thread.join(10)
