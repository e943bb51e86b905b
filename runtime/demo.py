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
from transport.zmq_client import PolicyClient

log = logging.getLogger(__name__)


class StatusLine:
    """Rewrites one terminal line at most `rate_hz` times a second."""

    def __init__(self, out: TextIO = sys.stderr, rate_hz: float = 4.0):
        self._out = out
        self._period = 1.0 / rate_hz
        self._last = 0.0

    def __call__(self, st: LoopStatus) -> None:
        now = time.monotonic()
        if now - self._last < self._period:
            return
        self._last = now
        delay = "-" if st.last_delay_ms is None else f"{st.last_delay_ms:.0f} ms"
        subtask = (st.subtask or "-")[:40]
        self._out.write(
            f"\r[demo] subtask: {subtask!r} (refresh {st.refresh_count}) | chunk latency {delay} | "
            f"buffer {st.depth:2d} | loop {st.achieved_hz:5.1f} Hz | underruns {st.underruns}   "
        )
        self._out.flush()


class Demo:
    """Runs the control loop on a thread until `stop()` or `duration_s`; `done` is set at the end."""

    def __init__(self, router: str, pub: str, duration_s: float | None, prompt: str = "pick up the orange block"):
        self.done = threading.Event()
        self.summary: dict | None = None
        self._router, self._pub, self._duration, self._prompt = router, pub, duration_s, prompt
        self._loop: ControlLoop | None = None
        self._thread = threading.Thread(target=self._run, name="demo-robot", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        settings = LoopSettings(
            prompt=self._prompt,
            hz=50.0,
            buffer=BufferSettings(request_when_left=25, blend="crossfade"),
            subtask_mode="refresh",
            refresh_interval_s=2.0,
            max_decoding_steps=8,
        )
        try:
            with PolicyClient(self._router, "demo-sim", timeout_s=30.0) as client:
                self._loop = ControlLoop(SimArm(), client, settings, self._pub, on_tick=StatusLine())
                self.summary = self._loop.run(self._duration)
            sys.stderr.write("\n")
            log.info("demo summary: %s", json.dumps(self.summary))
        except Exception:
            log.exception("the demo robot stopped")
        finally:
            self.done.set()

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.stop()
        self._thread.join(10)
