"""`--demo`: the simulated arm driven through the server's real ZMQ path, with a live status line."""

from __future__ import annotations

import json
import logging
import threading

from robots.sim import SimArm
from robots.tasks import PickPlaceTask
from runtime.robot.chunk_buffer import BufferSettings
from runtime.robot.control_loop import LoopSettings
from runtime.robot.episodes import TaskEpisodes
from runtime.robot.status_line import StatusLine
from transport.errors import TransportError
from transport.zmq_client import PolicyClient

log = logging.getLogger(__name__)


class Demo:
    """Runs pick-and-place episodes (`TaskEpisodes`) on a thread until `stop()` or `duration_s`;
    `done` is set at the end.

    The status line says which model drives the arm, so random weights are never mistaken for a
    policy (the checkpoint's path is in the server's `ready` line: the status line has no room for it).
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
        self._duration = duration_s
        self._line = StatusLine(model.partition(" (")[0])
        settings = LoopSettings(
            hz=50.0,
            buffer=BufferSettings(request_when_left=15, blend="crossfade"),
            subtask_mode="refresh",
            refresh_interval_s=0.5,
            max_decoding_steps=12,
        )
        self.episodes = TaskEpisodes(
            SimArm(image_size=image_size, seed=seed, task=PickPlaceTask()),
            # Made on the robot's thread, which alone uses it.
            lambda: PolicyClient(router, "demo-sim", timeout_s=30.0),
            settings,
            pub,
            episode_s,
            on_tick=self._line,
        )
        self._thread = threading.Thread(target=self._run, name="demo-robot", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.summary = s = self.episodes.run(self._duration)
            self._line.close()
            log.info("demo: %d of %d episodes done; %s", s["episodes_succeeded"], s["episodes"], json.dumps(s))
        except TransportError as e:
            log.error("the demo robot stopped: %s", e)
        except Exception:
            log.exception("the demo robot stopped")
        finally:
            self._line.close()
            self.done.set()

    def stop(self) -> None:
        self.episodes.stop()
        self._thread.join(10)
