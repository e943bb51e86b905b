"""`--rerun`: a robot's run read back from its `.rrd` with Rerun's own reader, per robot on one timeline;
the sink drops and counts rather than wait, reports a failing write, and without the flag nothing of it
exists (no thread, no `rerun` import)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from robots import run as robots_run
from robots.sim import CAMERAS
from runtime.policy_server.fixed_backend import FixedBackend
from runtime.rerun_sink import FORMS, RerunSink, RerunTarget, model_view
from runtime.robot.chunk_buffer import BufferSettings
from runtime.robot.control_loop import ControlLoop, LoopSettings
from runtime.robot.rerun_log import RobotLog
from runtime.robot.virtual_time import VirtualClock
from tests.support.rerun_files import read_rrd
from tests.support.server_process import ServerProcess
from tests.support.serving import zmq_server_thread
from tests.support.simulated_loop import HZ, SAFE, START_S, CountingRobot, SimServer, simulated_loop
from transport.zmq_client import PolicyClient

ROBOT = "arm-1"
SIM_STATE_DIM = SIM_ACTION_DIM = 4  # the sim arm without a task: three joints and the gripper


def with_column(rows: list[dict[str, Any]], column: str) -> list[dict[str, Any]]:
    return [row for row in rows if row.get(column) is not None]


def test_a_sim_arm_run_is_read_back_from_its_rrd_per_robot_on_one_timeline(tmp_path):
    rrd, out = tmp_path / "run.rrd", tmp_path / "stats.json"
    with ServerProcess("--fixed-reply", gateways=False) as server:
        with PolicyClient(server.router, "probe") as probe:
            model = probe.ping()["model"]
        code = robots_run.main(
            ["--server", server.router, "--pub", server.pub, "--robot-id", ROBOT, "--duration", "3",
             "--refresh-interval", "0.5", "--rerun", "save", str(rrd), "--stats-json", str(out),
             "--log-level", "WARNING"]
        )  # fmt: skip
    assert code == 0
    stats = json.loads(out.read_text())
    dropped, ticks, chunks = stats["rerun_dropped"], stats["ticks"], stats["chunks_received"]
    assert ticks == 150 and chunks >= 2 and stats["subtasks_seen"] >= 2

    rows = read_rrd(rrd)
    robot = f"/robots/{ROBOT}"
    assert rows and all(path.startswith(f"{robot}/") for path in rows)
    # One timeline: every row has its control tick and its time.
    assert all(row["step"] is not None and row["time"] is not None for path_rows in rows.values() for row in path_rows)

    def at_most_dropped_missing(count: int, expected: int) -> bool:
        return expected - dropped <= count <= expected

    # The cameras as the model received them: the sim's, set up at the model's input resolution.
    cameras = {path.rsplit("/", 1)[1] for path in rows if path.startswith(f"{robot}/camera/")}
    assert cameras == set(CAMERAS) & set(model["image_keys"])
    observations = len(rows[f"{robot}/camera/{CAMERAS[0]}"])
    assert observations >= chunks - dropped
    for camera in cameras:
        images = with_column(rows[f"{robot}/camera/{camera}"], "Image:format")
        assert len(images) == observations
        assert {(f[0]["height"], f[0]["width"]) for f in (row["Image:format"] for row in images)} == {
            tuple(model["input_resolution"])
        }
    for i in range(SIM_STATE_DIM):
        assert len(with_column(rows[f"{robot}/state/{i}"], "Scalars:scalars")) == observations

    # The actions as executed: one series per dimension, a row per tick.
    for dim in range(SIM_ACTION_DIM):
        executed = with_column(rows[f"{robot}/executed/{dim}"], "Scalars:scalars")
        assert at_most_dropped_missing(len(executed), ticks)
        steps = [row["step"] for row in executed]
        assert len(set(steps)) == len(steps) and set(steps) <= set(range(ticks))

    # Each chunk as planned: its horizon of steps per dimension, one slot's line each.
    horizon = model["action_horizon"]
    logged_chunks = None
    for dim in range(SIM_ACTION_DIM):
        planned = [
            row
            for path, path_rows in rows.items()
            if path.startswith(f"{robot}/planned/{dim}/")
            for row in with_column(path_rows, "Scalars:scalars")
        ]
        assert len(planned) % horizon == 0
        assert logged_chunks in (None, len(planned) // horizon)
        logged_chunks = len(planned) // horizon
    assert logged_chunks is not None and at_most_dropped_missing(logged_chunks, chunks)
    assert len(with_column(rows[f"{robot}/latency_ms"], "Scalars:scalars")) == logged_chunks

    # The subtasks: the one generated with the first chunk, then each refresh.
    subtasks = with_column(rows[f"{robot}/subtask"], "TextLog:text")
    assert at_most_dropped_missing(len(subtasks), stats["subtasks_seen"])
    assert all("fixed reply" in row["TextLog:text"][0] for row in subtasks)
    assert any("(refresh " in row["TextLog:text"][0] for row in subtasks)


@pytest.mark.parametrize(
    ("argv", "target"),
    [
        ([], None),
        (["--rerun", "spawn"], RerunTarget("spawn")),
        (["--rerun", "connect", "10.0.0.2:9876"], RerunTarget("connect", "10.0.0.2:9876")),
        (["--rerun", "save", "out/run.rrd"], RerunTarget("save", "out/run.rrd")),
    ],
)
def test_rerun_takes_three_forms(argv, target):
    assert robots_run.build_parser().parse_args(argv).rerun == target


@pytest.mark.parametrize("value", [["view"], ["connect", "localhost"], ["save", "run.json"], ["spawn", "now"]])
def test_a_bad_rerun_value_is_a_usage_error_naming_the_three_forms(value, capsys):
    with pytest.raises(SystemExit) as info:
        robots_run.build_parser().parse_args(["--rerun", *value])
    assert info.value.code == 2
    assert f"argument --rerun: expected {FORMS}, got {' '.join(value)!r}" in capsys.readouterr().err


def test_a_file_rerun_cannot_make_is_one_line_before_the_run(tmp_path, capsys):
    missing = tmp_path / "no-such-folder" / "run.rrd"
    with zmq_server_thread(FixedBackend("pi05_tiny")) as server:
        code = robots_run.main(
            ["--server", server.endpoints["router"], "--rerun", "save", str(missing), "--log-level", "WARNING"]
        )
    assert code == 2
    (line,) = capsys.readouterr().err.splitlines()  # the SDK's own words for it: no such folder
    assert line.startswith("robots.run: --rerun save: ") and str(missing) in line


class StandInRecording:
    """A recording that keeps what it is sent as (entity path, step) pairs; while `gate` is clear its
    writes wait (`writing` tells that the sink's thread is in one); a path in `broken` raises."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.writing = threading.Event()
        self.broken: set[str] = set()
        self.rows: list[tuple[str, int | None]] = []
        self.closed = False
        self._step: int | None = None

    def set_time(self, timeline: str, *, sequence: int | None = None, timestamp: float | None = None) -> None:
        if timeline == "step":
            self._step = sequence

    def log(self, path: str, entity: Any) -> None:
        self.writing.set()
        self.gate.wait()
        if path in self.broken:
            raise RuntimeError(f"cannot log {path}")
        self.rows.append((path, self._step))

    def send_columns(self, path: str, indexes: Any, columns: Any) -> None:
        self.rows.append((path, None))

    def flush(self) -> None:
        pass

    def disconnect(self) -> None:
        self.closed = True


def test_a_full_queue_drops_and_counts_and_never_waits():
    recording = StandInRecording()
    recording.gate.clear()
    sink = RerunSink(recording, queue_size=4)
    sink.log_latency(ROBOT, 0, 1.0)
    assert recording.writing.wait(60)  # the sink's thread holds step 0, blocked: the queue is empty
    for step in range(1, 8):  # 4 fit, 3 do not
        sink.log_latency(ROBOT, step, 1.0)
    assert sink.dropped == 3
    recording.gate.set()
    sink.close()
    assert recording.rows == [(f"/robots/{ROBOT}/latency_ms", step) for step in range(5)] and recording.closed


def test_a_failing_write_is_logged_and_the_sink_goes_on(caplog):
    recording = StandInRecording()
    recording.broken.add(f"/robots/{ROBOT}/latency_ms")
    sink = RerunSink(recording)
    with caplog.at_level(logging.ERROR, logger="runtime.rerun_sink"):
        sink.log_latency(ROBOT, 0, 1.0)
        sink.log_latency(ROBOT, 1, 1.0)
        sink.log_subtask(ROBOT, 2, "reach")
        sink.close()
    assert sink.failures == 2
    assert [r.message for r in caplog.records] == ["logging to Rerun failed (further failures are only counted)"]
    assert caplog.records[0].exc_info is not None
    assert recording.rows == [(f"/robots/{ROBOT}/subtask", 2)]


def test_the_loop_logs_each_run_after_the_last_on_the_robots_step_timeline():
    recording = StandInRecording()
    sink = RerunSink(recording)
    robot_log = RobotLog(sink, ROBOT)
    summaries = []
    for _ in range(2):  # two episodes: two loops, each counting its steps from 0
        clock = VirtualClock(START_S)
        server = SimServer(clock, 0.1)
        settings = LoopSettings(
            hz=HZ, buffer=BufferSettings(blend="replace", safe_action=SAFE), subtask_mode="refresh",
            refresh_interval_s=0.5,
        )  # fmt: skip
        loop = ControlLoop(
            CountingRobot(clock), server, settings, "sim://pub", clock=clock, sleep=clock.sleep, rerun=robot_log
        )
        summaries.append(loop.run(1.0))
    sink.close()
    assert sink.dropped == 0 and sink.failures == 0

    def steps(path: str) -> list[int | None]:
        return [step for logged, step in recording.rows if logged == f"/robots/{ROBOT}/{path}"]

    assert steps("executed/0") == steps("executed/1") == list(range(100))
    observed = steps("camera/base_0_rgb")
    assert observed == steps("state/0") and observed[0] == 0 and 50 in observed  # each run's first request
    assert len(steps("latency_ms")) == sum(s["chunks_received"] for s in summaries)
    assert len(steps("subtask")) == sum(s["subtasks_seen"] for s in summaries)
    planned = [path for path, _ in recording.rows if path.startswith(f"/robots/{ROBOT}/planned/")]
    assert {p.rsplit("/", 2)[1] for p in planned} == {"0", "1"}  # the robot's two action dimensions
    assert len({p.rsplit("/", 1)[1] for p in planned}) <= 3  # a few slots, however many chunks


def test_with_rerun_off_the_loop_starts_no_thread_and_never_imports_rerun():
    before = set(threading.enumerate())
    during: list[set[threading.Thread]] = []
    clock = VirtualClock(START_S)
    loop = simulated_loop(
        SimServer(clock, 0.1), CountingRobot(clock), on_tick=lambda _: during.append(set(threading.enumerate()))
    )
    loop.run(1.0)
    assert during and all(threads <= before for threads in during)  # none started (some may have ended)
    assert set(threading.enumerate()) <= before
    script = (
        "import sys, robots.run; robots.run.build_parser().parse_args(['--rerun', 'spawn']); "
        "print('rerun' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[2]
    )
    assert result.stdout.strip() == "False", result.stderr


def test_the_model_view_is_the_servers_resize_geometry():
    wide = np.full((4, 8, 3), 200, np.uint8)
    view = model_view(wide, 8)
    assert view.shape == (8, 8, 3)
    assert (view[2:6] == 200).all() and (view[:2] == 0).all() and (view[6:] == 0).all()  # centred, padded black
    assert model_view(wide, None) is wide and model_view(view, 8) is view  # as sent: no copy
