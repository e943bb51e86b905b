"""Which model the server runs when none is named: the demo shows the trained policy it ships."""

from pathlib import Path

import pytest

from configs import DEFAULT_MODEL, DEMO_MODEL, SHIPPED_CHECKPOINTS
from robots.sim import SimArm
from robots.tasks import PickPlaceTask
from runtime.policy_server.main import model_label, parse_args
from runtime.robot.control_loop import LoopStatus
from runtime.robot.demo import format_status


def test_demo_runs_the_shipped_trained_policy():
    args = parse_args(["--demo"])
    assert args.config == DEMO_MODEL
    assert Path(args.checkpoint) == SHIPPED_CHECKPOINTS[DEMO_MODEL]
    assert (Path(args.checkpoint) / "params").is_dir()
    assert model_label(args) == f"{DEMO_MODEL}: trained demo policy"


def test_random_weights_when_asked_for_or_when_nothing_ships():
    args = parse_args(["--demo", "--random-weights"])
    assert (args.config, args.checkpoint) == (DEFAULT_MODEL, None)
    assert model_label(args) == f"{DEFAULT_MODEL}: random weights"
    args = parse_args([])
    assert (args.config, args.checkpoint) == (DEFAULT_MODEL, None)
    args = parse_args(["--config", DEMO_MODEL, "--random-weights"])
    assert args.checkpoint is None and model_label(args) == f"{DEMO_MODEL}: random weights"


def test_a_named_config_loads_its_shipped_checkpoint_and_a_given_one_wins(tmp_path):
    assert Path(parse_args(["--config", DEMO_MODEL]).checkpoint) == SHIPPED_CHECKPOINTS[DEMO_MODEL]
    args = parse_args(["--config", DEMO_MODEL, "--checkpoint", str(tmp_path)])
    assert args.checkpoint == str(tmp_path) and model_label(args) == f"{DEMO_MODEL}: {tmp_path}"


def test_random_weights_and_a_checkpoint_contradict(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--random-weights", "--checkpoint", "x"])
    assert "contradict" in capsys.readouterr().err


def test_the_status_line_shows_the_demo_tasks_longest_subtask_whole():
    longest = max(
        (PickPlaceTask().subtask(SimArm(seed=s, task=PickPlaceTask(), image_size=8).scene, "move") for s in range(60)),
        key=len,
    )
    assert repr(longest) in format_status("pi05_demo", LoopStatus(subtask=longest))
