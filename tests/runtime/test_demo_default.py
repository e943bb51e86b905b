"""Which model the server runs when none is named: the trained policy it ships."""

from pathlib import Path

import pytest

from configs import DEMO_MODEL, SHIPPED_CHECKPOINTS
from robots.sim import SimArm
from robots.tasks import PickPlaceTask
from runtime.policy_server.flags import parse_args
from runtime.robot.control_loop import LoopStatus
from runtime.robot.episodes import Tally
from runtime.robot.status_line import format_status
from runtime.serving import checkpoint_of, model_info

SHIPPED = SHIPPED_CHECKPOINTS[DEMO_MODEL]


@pytest.mark.parametrize("argv", [[], ["--demo"]])
def test_the_default_is_the_shipped_trained_policy(argv):
    args = parse_args(argv)
    assert args.config == DEMO_MODEL
    assert Path(checkpoint_of(args)) == SHIPPED and (SHIPPED / "params").is_dir()
    info = model_info(args)
    assert info["trained"] is True and info["checkpoint"] == str(SHIPPED)
    assert info["label"] == f"{DEMO_MODEL}: trained demo policy ({SHIPPED})"


def test_random_weights_when_asked_for_or_when_nothing_ships():
    args = parse_args(["--random-weights"])
    assert (args.config, checkpoint_of(args)) == (DEMO_MODEL, None)
    assert model_info(args) == {
        "config": DEMO_MODEL, "checkpoint": None, "trained": False, "label": f"{DEMO_MODEL}: random weights",
    }  # fmt: skip
    assert checkpoint_of(parse_args(["--config", "pi05_tiny"])) is None


def test_a_given_checkpoint_wins_and_parsing_changes_no_value(tmp_path):
    args = parse_args(["--checkpoint", str(tmp_path)])
    assert checkpoint_of(args) == str(tmp_path) == args.checkpoint
    # Before loading, the checkpoint's own files may name its config; once loaded the engine's is named.
    assert model_info(args)["label"] == f"checkpoint {tmp_path}"
    assert model_info(args, "pi05_tiny")["label"] == f"pi05_tiny: checkpoint {tmp_path}"
    assert parse_args([]).checkpoint is None  # the shipped one is derived where it is used


def test_random_weights_and_a_checkpoint_contradict(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--random-weights", "--checkpoint", "x"])
    assert "contradict" in capsys.readouterr().err


def test_the_status_line_shows_the_demo_tasks_longest_subtask_whole_in_a_120_column_terminal():
    longest = max(
        (PickPlaceTask().subtask(SimArm(seed=s, task=PickPlaceTask(), image_size=8).scene, "move") for s in range(60)),
        key=len,
    )
    assert len(longest) == 44  # "move the green block to the black plate at 2"
    # The demo's line as a 120-column terminal gets it (one column spare): the model, the episodes,
    # then the subtask, whole; what follows it is cut.
    line = format_status("pi05_demo: trained demo policy", LoopStatus(subtask=longest), Tally(12, 9), width=119)
    assert line.startswith(f"pi05_demo: trained demo policy | episode 12 (9 done) | {longest!r} | ")
    assert len(line) <= 119
