"""LeRobot robots on the robot side: the mapping of a LeRobot robot's names to the model's state,
camera slots and actions, its refusal of a misfit, the connection around a run, and
`python -m robots.run --robot lerobot` against a real policy server in a process of its own.

No hardware and no LeRobot here: the robot is `tests/support/lerobot_standin.py`, a stand-in that
keeps LeRobot's `Robot` interface as LeRobot's source has it (an SO-101 follower's six motors and
two cameras), injected where `robots.run` would build LeRobot's robot (`make_lerobot_device`).
"""

from __future__ import annotations

import importlib.util
import json
import logging

import numpy as np
import pytest

from robots import run as robots_run
from robots.lerobot_robot import (
    INSTALL,
    LeRobotConnectError,
    LeRobotSetupError,
    fit_lerobot,
    make_lerobot_device,
    map_lerobot,
)
from robots.server_model import Mismatch, ServerModel
from runtime.policy_server.fixed_backend import FixedBackend
from tests.support.lerobot_standin import SO101_MOTORS, DeviceNotConnectedError, StandInSO101
from tests.support.server_process import ServerProcess
from tests.support.serving import zmq_server_thread

MOTOR_KEYS = tuple(f"{motor}.pos" for motor in SO101_MOTORS)
SLOTS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")


def model(**fields) -> ServerModel:
    """A server's model as its ping reports it: Pi0.5's three camera slots and 32 action dims, any
    state, unless `fields` say otherwise."""
    return ServerModel(
        **{"config": "pi05_so101", "image_keys": SLOTS, "action_dim": 32, "action_horizon": 50, **fields}
    )


def test_the_standin_keeps_lerobots_interface():
    robot = StandInSO101()
    # The features are there before it connects; using it is not.
    assert tuple(k for k, v in robot.observation_features.items() if v is float) == MOTOR_KEYS
    assert robot.observation_features["front"] == (240, 320, 3)
    assert tuple(robot.action_features) == MOTOR_KEYS
    assert not robot.is_connected and robot.is_calibrated
    with pytest.raises(DeviceNotConnectedError):
        robot.get_observation()
    with pytest.raises(ConnectionError):  # LeRobot's errors are ConnectionErrors
        robot.send_action(dict.fromkeys(MOTOR_KEYS, 0.0))
    robot.connect(calibrate=True)
    with pytest.raises(ConnectionError):  # connecting twice
        robot.connect()
    obs = robot.get_observation()
    assert set(obs) == set(robot.observation_features) and obs["wrist"].dtype == np.uint8
    assert robot.send_action({"gripper.pos": 50.0}) == {"gripper.pos": 50.0}
    robot.disconnect()
    assert not robot.is_connected


def test_the_state_is_the_robots_motors_in_its_order_and_the_actions_its_motors():
    robot = StandInSO101()
    arm = fit_lerobot(robot, model(), control_hz=30.0)
    assert arm.mapping.state_keys == MOTOR_KEYS and arm.mapping.action_keys == MOTOR_KEYS
    assert arm.action_dim == 6 and arm.control_hz == 30.0
    with arm.connected():
        obs = arm.observe()
        np.testing.assert_array_equal(obs.state, np.arange(6, dtype=np.float32))  # the stand-in's positions
        assert obs.state.dtype == np.float32
        arm.act(np.arange(32, dtype=np.float64) * 0.5)  # the model's first six dims, by name
    assert robot.sent == [{key: 0.5 * i for i, key in enumerate(MOTOR_KEYS)}]
    assert all(type(v) is float for v in robot.sent[0].values())


def test_without_camera_aliases_the_cameras_fill_the_models_slots_in_order(caplog):
    caplog.set_level(logging.INFO, "robots.lerobot_robot")
    arm = fit_lerobot(StandInSO101(), model(), control_hz=30.0)
    assert arm.mapping.cameras == (("front", SLOTS[0]), ("wrist", SLOTS[1]))
    assert "the robot's cameras fill the model's slots in order: front -> base_0_rgb, wrist -> left_wrist_0_rgb" in (
        caplog.text
    )
    with arm.connected():
        images = arm.observe().images
    assert set(images) == {SLOTS[0], SLOTS[1]}  # the third slot is masked by the server, not invented
    assert images[SLOTS[0]].shape == (240, 320, 3) and images[SLOTS[0]].dtype == np.uint8


def test_camera_aliases_map_the_robots_cameras_by_name(caplog):
    # Both of a LeRobot dataset's forms: the feature key and the camera's bare name.
    aliases = {"observation.images.wrist": SLOTS[1], "front": SLOTS[0], "observation.images.side": SLOTS[2]}
    robot = StandInSO101(cameras={"wrist": (48, 64), "front": (48, 64), "top": (48, 64)})
    arm = fit_lerobot(robot, model(camera_aliases=aliases), control_hz=30.0)
    assert arm.mapping.cameras == (("wrist", SLOTS[1]), ("front", SLOTS[0]))
    assert "the robot's cameras top have no slot in the model: not sent" in caplog.text
    with arm.connected():
        images = arm.observe().images
    assert set(images) == {SLOTS[0], SLOTS[1]}
    np.testing.assert_array_equal(images[SLOTS[1]], np.full((48, 64, 3), 1, np.uint8))  # the first camera's frame


@pytest.mark.parametrize(
    ("fields", "cameras", "message"),
    [
        (
            {"action_dim": 4},
            None,
            "the server's model pi05_so101 gives 4 action values; the robot takes 6 (shoulder_pan.pos, "
            "shoulder_lift.pos, elbow_flex.pos, wrist_flex.pos, wrist_roll.pos, gripper.pos): serve a checkpoint "
            "trained on this robot",
        ),
        (
            {"state_dim": 4},
            None,
            "the server's model pi05_so101 takes 4 state values; the robot has 6 (shoulder_pan.pos, "
            "shoulder_lift.pos, elbow_flex.pos, wrist_flex.pos, wrist_roll.pos, gripper.pos): serve a checkpoint "
            "trained on this robot",
        ),
        (
            {"camera_aliases": {"observation.images.top": SLOTS[0]}},
            None,
            "the server's model pi05_so101 takes cameras named observation.images.top; the robot's are front, "
            "wrist: name them in --lerobot-cameras as its dataset did",
        ),
        (
            {},
            {},
            "the robot has no color camera and the server's model pi05_so101 takes cameras base_0_rgb, "
            "left_wrist_0_rgb, right_wrist_0_rgb: give it cameras with --lerobot-cameras",
        ),
    ],
)
def test_a_robot_that_does_not_fit_the_model_is_refused_in_one_line(fields, cameras, message):
    robot = StandInSO101(cameras=cameras)
    with pytest.raises(Mismatch) as info:
        map_lerobot(robot.observation_features, robot.action_features, model(**fields))
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
    assert robot.connects == 0  # refused from its features, before it connects


def test_the_robot_is_disconnected_after_its_run_and_after_an_error():
    robot = StandInSO101()
    arm = fit_lerobot(robot, model(), control_hz=30.0)
    with arm.connected():
        assert robot.is_connected
    assert (robot.connects, robot.disconnects) == (1, 1) and not robot.is_connected
    with pytest.raises(KeyboardInterrupt), arm.connected():
        arm.act(np.zeros(6))
        raise KeyboardInterrupt
    assert (robot.connects, robot.disconnects) == (2, 2) and not robot.is_connected


def test_a_robot_that_does_not_connect_is_one_error_and_needs_no_disconnect():
    robot = StandInSO101(fail_connect=True)
    arm = fit_lerobot(robot, model(), control_hz=30.0)
    with pytest.raises(LeRobotConnectError) as info, arm.connected():
        pytest.fail("the run must not start")
    assert str(info.value).startswith("the LeRobot robot did not connect: Could not connect on port '/dev/ttyACM0'")
    assert robot.disconnects == 0


@pytest.mark.skipif(importlib.util.find_spec("lerobot") is not None, reason="LeRobot is installed here")
def test_without_lerobot_installed_robots_run_says_how_to_install_it(capsys):
    with pytest.raises(LeRobotSetupError) as info:
        make_lerobot_device("so101_follower", "/dev/ttyACM0")
    assert str(info.value) == f"--robot lerobot needs LeRobot (No module named 'lerobot'): {INSTALL}"
    with zmq_server_thread(FixedBackend("pi05_tiny")) as server:
        code = robots_run.main(["--robot", "lerobot", "--server", server.endpoints["router"], "--log-level", "ERROR"])
    assert code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"robots.run: --robot lerobot needs LeRobot (No module named 'lerobot'): {INSTALL}"
    ]


@pytest.fixture
def standin(monkeypatch) -> tuple[StandInSO101, list[tuple]]:
    """The stand-in, which `robots.run` gets where it would build LeRobot's robot, and the
    `--lerobot-*` flags it was asked for with."""
    robot, flags = StandInSO101(), []

    def make(*args):
        flags.append(args)
        return robot

    monkeypatch.setattr(robots_run, "make_lerobot_device", make)
    return robot, flags


def test_robots_run_refuses_a_robot_the_model_cannot_drive(standin, capsys):
    robot, _ = standin
    with zmq_server_thread(FixedBackend("pi05_demo")) as server:  # 4 action values for 6 motors
        code = robots_run.main(["--robot", "lerobot", "--server", server.endpoints["router"], "--log-level", "ERROR"])
    assert code == 2
    assert capsys.readouterr().err.splitlines() == [
        "robots.run: the server's model pi05_demo gives 4 action values; the robot takes 6 "
        "(shoulder_pan.pos, shoulder_lift.pos, elbow_flex.pos, wrist_flex.pos, wrist_roll.pos, gripper.pos): "
        "serve a checkpoint trained on this robot"
    ]
    assert robot.connects == 0


def test_robots_run_drives_a_lerobot_robot_with_real_time_chunking(standin, tmp_path):
    robot, flags = standin
    out = tmp_path / "stats.json"
    cameras = "{front: {type: opencv, index_or_path: 0, width: 320, height: 240, fps: 30}}"
    with ServerProcess("--fixed-reply", gateways=False) as server:
        code = robots_run.main(
            ["--robot", "lerobot", "--lerobot-port", "/dev/ttyACM0", "--lerobot-id", "arm-1",
             "--lerobot-cameras", cameras, "--server", server.router, "--pub", server.pub, "--hz", "30",
             "--duration", "2", "--blend", "rtc", "--request-when-left", "10", "--stats-json", str(out),
             "--log-level", "WARNING"]
        )  # fmt: skip
    assert code == 0
    assert flags == [("so101_follower", "/dev/ttyACM0", "arm-1", cameras)]
    stats = json.loads(out.read_text())
    # Real-time chunking asks every 25 steps: the first chunk, and at least one that continues it,
    # its guidance accepted by the server.
    assert stats["ticks"] == 60 and stats["chunks_received"] >= 2 and stats["request_errors"] == 0
    assert stats["episodes"] == 1  # one run, one connection
    assert stats["subtasks_seen"] >= 1  # the refresh mode's subtask reached the robot
    # Every tick's action reached the robot, by its motors' names (the fixed reply's zeros).
    assert len(robot.sent) == 60
    assert all(action == dict.fromkeys(MOTOR_KEYS, 0.0) for action in robot.sent)
    assert (robot.connects, robot.disconnects) == (1, 1) and not robot.is_connected
