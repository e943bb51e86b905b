"""`--demo`: the simulated arm driven through the server's real ZMQ path, with a live status line."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from typing import TextIO

from robots.sim import SimArm
from runtime.chunk_buffer import BufferSettings
from runtime.control_loop import ControlLoop, LoopSettings, LoopStatus
from transport.errors import TransportError
from transport.zmq_client import PolicyClient

log = logging.getLogger(__name__)


class StatusLine:
    """Rewrites one terminal line at most `rate_hz` times a second."""

    def __init__(self, label: str = "demo", out: TextIO = sys.stderr, rate_hz: float = 4.0):
        self._label = label
        self._out = out
        self._period = 1.0 / rate_hz
        self._last = 0.0

    def __call__(self, st: LoopStatus) -> None:
        now = time.monotonic()
        if now - self._last < self._period:
            return
        self._last = now
        self._out.write(f"\r{format_status(self._label, st)}   ")
        self._out.flush()


def format_status(label: str, st: LoopStatus) -> str:
    """One line: the subtask, chunk latency, buffer depth, loop rate, underruns and outages."""
    delay = "-" if st.last_delay_ms is None else f"{st.last_delay_ms:.0f} ms"
    subtask = (st.subtask or "-")[:40]
    service = f"outages {st.outages} ({st.outage_s:.1f} s without service)"
    if st.in_outage:
        service = f"NO SERVER: holding the safe action | {service}"
    return (
        f"[{label}] subtask: {subtask!r} (refresh {st.refresh_count}) | chunk latency {delay} | "
        f"buffer {st.depth:2d} | loop {st.achieved_hz:5.1f} Hz | underruns {st.underruns} | {service}"
    )


class Demo:
    """Runs the control loop on a thread until `stop()` or `duration_s`; `done` is set at the end."""

    def __init__(self, router: str, pub: str, duration_s: float | None, prompt: str = "pick up the orange block"):
        self.done = threading.Event()
        self.summary: dict | None = None
        self._duration = duration_s
        arm = SimArm()
        settings = LoopSettings(
            prompt=prompt,
            hz=50.0,
            buffer=BufferSettings(request_when_left=25, blend="crossfade", safe_action=arm.safe_action),
            subtask_mode="refresh",
            refresh_interval_s=2.0,
            max_decoding_steps=8,
        )
        # Made here, used only by the robot's thread from its start on (ZMQ sockets may move
        # between threads across such a barrier).
        self._client = PolicyClient(router, "demo-sim", timeout_s=30.0)
        self._loop = ControlLoop(arm, self._client, settings, pub, on_tick=StatusLine())
        self._thread = threading.Thread(target=self._run, name="demo-robot", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.summary = self._loop.run(self._duration)
            sys.stderr.write("\n")
            log.info("demo summary: %s", json.dumps(self.summary))
        except TransportError as e:
            log.error("the demo robot stopped: %s", e)
        except Exception:
            log.exception("the demo robot stopped")
        finally:
            self._client.close()
            self.done.set()

    def stop(self) -> None:
        self._loop.stop()
        self._thread.join(10)
