"""Rerun (`--rerun`): what each robot sees, plans and does, logged per robot on one timeline.

`--rerun spawn` starts a viewer, `--rerun connect HOST:PORT` streams to a running one (`rerun` listens
on 9876), `--rerun save FILE.rrd` writes a file to open later (`rerun FILE.rrd`). Without the flag
nothing of this exists: the callers hold `None`, make no copy and start no thread, and `rerun-sdk` (the
`rerun` extra) is imported only by `RerunSink.open`.

Callers never wait for Rerun: each `log_*` method only puts one item on a bounded queue (`put_nowait`),
and one thread of the sink's own encodes and sends it; when Rerun cannot keep up the queue fills and
further items are dropped and counted (`dropped`), so a control loop or a device thread runs as it
would without it. The arrays handed in are kept, not copied: callers hand over arrays they no longer
write (an observation's, a reply's), as they would to a request.

Entities, per robot: `robots/<robot_id>/camera/<name>` (the images as the model receives them),
`state/<i>`, `executed/<dim>` (one series per dimension), `planned/<dim>/<slot>`, `subtask` (a text
log: each refresh and each subtask generated with a chunk) and `latency_ms`. Rows are on two
timelines: `step`, the robot's control tick, and `time`, the wall clock when it was logged, which
lines robots and processes up with each other. The policy server's `--rerun` logs its own view under
`server/<session>/` (`runtime.policy_server.rerun_log`).

A chunk is logged as the series it plans over the steps ahead (its action for step s at s, from the
step of the observation it answers), one line per chunk: a plot joins consecutive points of an entity,
so successive chunks in one entity, whose steps overlap, would zigzag between them. Each chunk takes
the lowest `slot` whose previous chunk ended before it starts, and a `Clear` after its last step ends
its line there, so `planned/<dim>` in a plot shows every plan as its own line beside the executed
series, with as many entities as chunks overlap at once (two or three), however long the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

FORMS = "spawn, connect HOST:PORT or save FILE.rrd"
# Items waiting for the sink's thread: at 50 Hz a few seconds of ticks, so a short stall of the
# viewer or the disk costs nothing, and a long one costs frames, never the caller's time.
QUEUE_SIZE = 256
STEP, TIME = "step", "time"


class RerunUnavailable(Exception):
    """`--rerun` cannot be served: rerun-sdk is not installed, or the viewer or file cannot be had."""


@dataclasses.dataclass(frozen=True)
class RerunTarget:
    """Where the recording goes: a viewer spawned here, the viewer at `address` (HOST:PORT), or the
    file `address`."""

    kind: Literal["spawn", "connect", "save"]
    address: str | None = None

    @classmethod
    def parse(cls, words: Sequence[str]) -> RerunTarget:
        """`["spawn"]`, `["connect", "HOST:PORT"]` or `["save", "FILE.rrd"]`; else `ValueError`
        naming the three forms."""
        match list(words):
            case ["spawn"]:
                return cls("spawn")
            case ["connect", address] if _is_host_port(address):
                return cls("connect", address)
            case ["save", path] if path.endswith(".rrd"):
                return cls("save", path)
        raise ValueError(f"expected {FORMS}, got {' '.join(words)!r}")


def _is_host_port(text: str) -> bool:
    host, _, port = text.rpartition(":")
    return bool(host) and port.isdigit() and 1 <= int(port) <= 65535


class _RerunAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None) -> None:
        try:
            setattr(namespace, self.dest, RerunTarget.parse(values))
        except ValueError as e:
            raise argparse.ArgumentError(self, str(e)) from None


# `--rerun`'s argparse settings: a `RerunTarget`, or None when not given (off).
RERUN_ARGUMENT: dict[str, Any] = {
    "nargs": "+",
    "action": _RerunAction,
    "default": None,
    "metavar": ("MODE", "ARG"),
    "help": f"log to Rerun (the rerun extra): {FORMS} (off by default)",
}


def add_rerun_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rerun", **RERUN_ARGUMENT)


def model_view(image: np.ndarray, size: int | None) -> np.ndarray:
    """`image` as the model receives it: `policy.engine.images.resize_with_pad`'s geometry (aspect
    ratio kept, bilinear, centred, padded black) done with Pillow, since a robot has no JAX. An
    image at the model's resolution already (the sim's, set up from the server's ping), or with no
    resolution known (`size` None), is what the model gets as it is."""
    if size is None or image.shape[:2] == (size, size):
        return image
    h, w = image.shape[:2]
    ratio = max(w / size, h / size)
    rh, rw = int(h / ratio), int(w / ratio)
    out = np.zeros((size, size, 3), np.uint8)
    top, left = (size - rh) // 2, (size - rw) // 2
    out[top : top + rh, left : left + rw] = np.asarray(
        Image.fromarray(image).resize((rw, rh), Image.Resampling.BILINEAR)
    )
    return out


class RerunSink:
    """One recording, fed from any thread through a bounded queue that the sink's own thread drains.

    `recording` is a `rerun.RecordingStream` with its sink set (`open` makes one; tests pass a
    stand-in). A write that fails is logged (the first with its traceback) and counted, and the
    thread goes on with the next. `close` sends what is queued, flushes the recording and ends it
    (a file is complete then)."""

    def __init__(self, recording: Any, queue_size: int = QUEUE_SIZE, root: str = "robots"):
        import rerun  # the extra, imported only when a sink is made

        self._rr = rerun
        self._rec = recording
        self._root = root  # the entities' first part: `robots` (the robots' own view) or `server`
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue(queue_size)
        self._dropped = 0
        self._drop_lock = threading.Lock()  # callers on several threads may drop at once
        self.failures = 0
        self._slots: dict[str, list[int]] = {}  # per robot, the step each planned slot is free after
        self._thread = threading.Thread(target=self._drain, name="rerun-sink", daemon=True)
        self._thread.start()

    @classmethod
    def open(cls, target: RerunTarget, application_id: str = "pi05-runtime", root: str = "robots") -> RerunSink:
        """A sink on a new recording sent to `target`. Raises `RerunUnavailable`, in one line, without
        rerun-sdk or when the viewer cannot be spawned or the file not made."""
        try:
            import rerun
        except ImportError:
            raise RerunUnavailable("--rerun needs rerun-sdk: pip install 'pi05-runtime[rerun]'") from None
        rec = rerun.RecordingStream(application_id)
        rec.set_log_time_enabled(False)  # `time` is when it happened, not when Rerun got it
        try:
            if target.kind == "spawn":
                rec.spawn()
            elif target.kind == "connect":
                rec.connect_grpc(f"rerun+http://{target.address}/proxy")
            else:
                rec.save(target.address)
        except RuntimeError as e:  # what the SDK raises: no viewer to spawn, a file it cannot make
            raise RerunUnavailable(f"--rerun {target.kind}: {e}") from None
        log.info("logging to Rerun: %s %s", target.kind, target.address or "")
        return cls(rec, root=root)

    @property
    def dropped(self) -> int:
        """Items dropped because the queue was full: Rerun could not keep up."""
        return self._dropped

    # ------------------------------------------------------------------ callers' side: enqueue only

    def log_images(self, robot_id: str, step: int, images: Mapping[str, np.ndarray], size: int | None) -> None:
        """The cameras of one observation, shown at the model's input resolution `size` (the resize,
        if any, runs on the sink's thread)."""
        self._put(self._write_images, robot_id, step, time.time(), images, size)

    def log_state(self, robot_id: str, step: int, state: np.ndarray) -> None:
        self._put(self._write_series, robot_id, "state", step, time.time(), state)

    def log_executed(self, robot_id: str, step: int, action: np.ndarray) -> None:
        self._put(self._write_series, robot_id, "executed", step, time.time(), action)

    def log_planned(self, robot_id: str, step: int, first_step: int, actions: np.ndarray, period_s: float) -> None:
        """A chunk (horizon x dims) arriving at `step`, planning step `first_step` on, a tick each
        `period_s` seconds."""
        self._put(self._write_planned, robot_id, step, time.time(), first_step, actions, period_s)

    def log_subtask(self, robot_id: str, step: int, text: str, refresh_count: int | None = None) -> None:
        self._put(self._write_subtask, robot_id, step, time.time(), text, refresh_count)

    def log_chunk(self, robot_id: str, step: int, actions: np.ndarray) -> None:
        """A whole chunk (horizon x dims) as one tensor at `step`: the server's view, which knows no
        robot tick to lay it out on."""
        self._put(self._write_chunk, robot_id, step, time.time(), actions)

    def log_latency(self, robot_id: str, step: int, ms: float) -> None:
        """The inference latency of the chunk arriving at `step`, from its observation, in ms."""
        self._put(self._write_latency, robot_id, step, time.time(), ms)

    def _put(self, write: Callable[..., None], *args: Any) -> None:
        try:
            self._queue.put_nowait(functools.partial(write, *args))
        except queue.Full:
            with self._drop_lock:
                self._dropped += 1

    def close(self) -> None:
        """Sends what is queued, then flushes and ends the recording (idempotent; may wait)."""
        if not self._thread.is_alive():
            return
        self._queue.put(None)
        self._thread.join()
        self._rec.flush()
        self._rec.disconnect()
        if self._dropped or self.failures:
            log.warning("Rerun: %d items dropped (it could not keep up), %d failed", self._dropped, self.failures)

    # ------------------------------------------------------------------ the sink's thread

    def _drain(self) -> None:
        while (write := self._queue.get()) is not None:
            try:
                write()
            except Exception:
                self.failures += 1
                if self.failures == 1:
                    log.exception("logging to Rerun failed (further failures are only counted)")

    def _at(self, step: int, at: float) -> None:
        self._rec.set_time(STEP, sequence=step)
        self._rec.set_time(TIME, timestamp=at)

    def _path(self, robot_id: str, *parts: object) -> str:
        return self._rr.new_entity_path([self._root, robot_id, *(str(p) for p in parts)])

    def _write_images(
        self, robot_id: str, step: int, at: float, images: Mapping[str, np.ndarray], size: int | None
    ) -> None:
        self._at(step, at)
        for name, image in images.items():
            self._rec.log(self._path(robot_id, "camera", name), self._rr.Image(model_view(image, size)))

    def _write_series(self, robot_id: str, what: str, step: int, at: float, values: np.ndarray) -> None:
        self._at(step, at)
        for i, value in enumerate(np.asarray(values, np.float64).reshape(-1)):
            self._rec.log(self._path(robot_id, what, i), self._rr.Scalars(value))

    def _write_planned(
        self, robot_id: str, step: int, at: float, first_step: int, actions: np.ndarray, period_s: float
    ) -> None:
        rr = self._rr
        slots = self._slots.setdefault(robot_id, [])
        slot = next((i for i, free_after in enumerate(slots) if free_after < first_step), len(slots))
        end = first_step + len(actions)  # its Clear's step
        slots[slot : slot + 1] = [end]  # a new slot past the last one, or the free one taken
        steps = np.arange(first_step, end)
        indexes = [rr.TimeColumn(STEP, sequence=steps), rr.TimeColumn(TIME, timestamp=at + (steps - step) * period_s)]
        self._at(end, at + (end - step) * period_s)
        values = np.asarray(actions, np.float64)
        for dim in range(values.shape[1]):
            path = self._path(robot_id, "planned", dim, slot)
            self._rec.send_columns(path, indexes, rr.Scalars.columns(scalars=values[:, dim]))
            self._rec.log(path, rr.Clear(recursive=False))

    def _write_subtask(self, robot_id: str, step: int, at: float, text: str, refresh_count: int | None) -> None:
        self._at(step, at)
        line = text if refresh_count is None else f"{text} (refresh {refresh_count})"
        self._rec.log(self._path(robot_id, "subtask"), self._rr.TextLog(line))

    def _write_chunk(self, robot_id: str, step: int, at: float, actions: np.ndarray) -> None:
        self._at(step, at)
        self._rec.log(self._path(robot_id, "chunk"), self._rr.Tensor(np.asarray(actions), dim_names=("step", "dim")))

    def _write_latency(self, robot_id: str, step: int, at: float, ms: float) -> None:
        self._at(step, at)
        self._rec.log(self._path(robot_id, "latency_ms"), self._rr.Scalars(ms))
