"""`python -m robots.eval`: episodes through the real server and loop, a flat JSON summary, a PNG."""

from __future__ import annotations

import concurrent.futures
import json

import numpy as np
from PIL import Image, ImageDraw

from robots import eval as robots_eval
from robots.sim import SimArm
from robots.tasks import COLOURS, PHASES, PickPlaceTask
from runtime.policy_server.fixed_backend import FixedBackend
from runtime.robot.virtual_time import VirtualClock
from tests.support.serving import zmq_server_thread


def test_one_episode_against_a_fixed_reply_server_writes_the_summary_and_the_picture(tmp_path):
    out = tmp_path / "eval.json"
    with zmq_server_thread(FixedBackend("pi05_demo")) as server:
        code = robots_eval.main(
            ["--server", server.endpoints["router"], "--pub", server.endpoints["pub"], "--episodes", "1",
             "--seed", "3", "--json", str(out), "--max-episode-s", "1", "--latency-ms", "40"]
        )  # fmt: skip
    assert code == 0
    summary = json.loads(out.read_text())
    for key in (
        "success_rate", "episodes", "mean_time_to_success_s", "subtask_transitions_mean",
        "subtask_phase_agreement", "subtask_text_agreement", "subtask_order_rate", "underruns", "chunks_received",
    ):  # fmt: skip
        assert key in summary and not isinstance(summary[key], dict | list)
    # Zero actions send the gripper to the arm's base: no success, and the server's one subtask text.
    assert summary["episodes"] == 1 and summary["success_rate"] == 0.0
    assert summary["mean_time_to_success_s"] is None and summary["ticks"] == 50
    assert summary["chunks_received"] >= 1 and summary["latency_ms"] == 40.0
    assert summary["inference_delay_ms_p50"] >= 40.0  # the injected latency is in the loop's delays
    with Image.open(out.with_suffix(".png")) as png:
        assert png.width > 400 and png.height >= 240


class _FakeClient:
    def __init__(self):
        self.inner: list[concurrent.futures.Future] = []
        self.closed = False

    def start_infer(self, *args, **kwargs):
        self.inner.append(concurrent.futures.Future())
        return self.inner[-1]

    def poll(self, timeout_s: float = 0.0) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def test_the_delayed_client_holds_each_reply_until_its_latency_has_passed():
    clock = VirtualClock()
    fake = _FakeClient()
    client = robots_eval.DelayedClient(fake, 0.2, clock=clock, sleep=clock.sleep)
    future = client.start_infer({}, "task")
    fake.inner[0].set_result({"actions": 1})
    client.poll()
    assert not future.done()  # the reply came, the latency has not passed
    clock.advance(0.21)
    client.poll()
    assert future.result() == {"actions": 1}
    failing = client.start_infer({}, "task")
    fake.inner[1].set_exception(TimeoutError("lost"))
    clock.advance(0.3)
    client.poll()
    assert isinstance(failing.exception(), TimeoutError)
    cancelled = client.start_infer({}, "task")
    cancelled.cancel()
    client.poll()
    assert fake.inner[2].cancelled()
    client.close()  # anything else reaches the wrapped client
    assert fake.closed


def test_subtask_order_and_transitions_are_read_from_the_texts():
    task = PickPlaceTask()
    arm = SimArm(seed=0, task=task, image_size=8)
    ep = robots_eval.Episode(0, arm.prompt, arm.scene.copy(), arm.q.copy())
    reach, grasp, move = (task.subtask(arm.scene, p) for p in ("reach", "grasp", "move"))
    ep.subtasks = [None, reach, reach, grasp, move, move]
    assert ep.transitions == 2 and ep.in_order(task)
    ep.subtasks = [reach, move, grasp]
    assert not ep.in_order(task)
    ep.subtasks = [reach, "something else", reach]
    assert ep.transitions == 2 and not ep.in_order(task)
    assert np.array_equal(ep.subtask_phases(task), [0, -1, 0])
    # The phase is read without the place: a wrong place still names the phase; another block does not.
    wrong_place = reach.rsplit(" ", 1)[0] + " 9"
    other = next(c for c in COLOURS if c not in reach)
    ep.subtasks = [wrong_place, reach.replace(arm.scene.block_colours[arm.scene.target], other), "done"]
    assert np.array_equal(ep.subtask_phases(task), [0, -1, 4])


def test_the_readmes_command_needs_neither_server_nor_json(tmp_path, capsys):
    args = robots_eval.build_parser().parse_args(["--episodes", "4", "--seed", "100", "--png", "x.png"])
    assert args.server == "tcp://127.0.0.1:5555" and args.json is None  # the default server's ROUTER
    png = tmp_path / "episodes.png"
    with zmq_server_thread(FixedBackend("pi05_demo")) as server:
        code = robots_eval.main(
            ["--server", server.endpoints["router"], "--episodes", "1", "--max-episode-s", "0.5", "--png", str(png)]
        )
    assert code == 0 and png.is_file() and list(tmp_path.iterdir()) == [png]  # the picture, no JSON
    assert capsys.readouterr().err.splitlines()[-1] == f"success rate 0.00 over 1 episodes; wrote {png}"


def test_the_timeline_names_the_phases_on_its_axis():
    task = PickPlaceTask()
    arm = SimArm(seed=0, task=task, image_size=8)
    ep = robots_eval.Episode(0, arm.prompt, arm.scene.copy(), arm.q.copy())
    ep.times, ep.phases, ep.subtasks = [0.0, 1.0, 2.0], ["reach", "grasp", "move"], [None, None, None]
    img = np.asarray(robots_eval.timeline_panel(ep, task, size=(560, 240)).convert("L"))
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))
    top, bottom, left = 24, 240 - 28, 56  # the chart's frame (robots.plot.line_chart)
    y_lo, y_hi = -0.2, len(PHASES) - 0.8
    for i, name in enumerate(PHASES):
        y = round(bottom - (i - y_lo) / (y_hi - y_lo) * (bottom - top))
        # The margin left of the frame, at this phase's height, holds a word as wide as its name.
        ink = np.nonzero((img[y - 6 : y + 7, :left] < 128).any(axis=0))[0]
        assert len(ink), f"nothing written at {name!r}'s height"
        assert abs((ink[-1] - ink[0] + 1) - measure.textlength(name)) <= 2, name
