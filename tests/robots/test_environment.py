"""An openpi-style ALOHA environment runs under the control loop through its adapter alone."""

from __future__ import annotations

import numpy as np

from robots.adapters import ALOHA_CAMERAS, get_adapter
from robots.environment import EnvironmentRobot
from runtime.robot.chunk_buffer import BufferSettings
from runtime.robot.control_loop import ControlLoop, LoopSettings
from tests.support.serving import zmq_server_thread
from transport.zmq_client import PolicyClient


class AlohaLikeEnv:
    """openpi's Environment interface over a trivial bimanual state (14 joints, CHW cameras)."""

    def __init__(self):
        self.state = np.full(14, 0.5)
        self.applied: list[np.ndarray] = []
        self.rng = np.random.default_rng(0)

    def reset(self) -> None:
        self.applied.clear()

    def get_observation(self) -> dict:
        images = {k: self.rng.integers(0, 256, (3, 120, 160), dtype=np.uint8) for k in ALOHA_CAMERAS}
        return {"images": images, "state": self.state.copy()}

    def apply_action(self, action: dict) -> None:
        self.applied.append(np.asarray(action["actions"]))


def test_adapted_environment_maps_both_ways():
    env = AlohaLikeEnv()
    robot = EnvironmentRobot(env, get_adapter("aloha"), control_hz=50)
    obs = robot.observe()
    assert obs.images["base_0_rgb"].shape == (120, 160, 3) and obs.state.shape == (14,)
    assert obs.state[1] == -0.5  # joint flip
    robot.act(np.full(32, 0.2))
    assert env.applied[-1].shape == (14,) and env.applied[-1][1] == -0.2


def test_adapted_environment_under_the_control_loop(engine):
    env = AlohaLikeEnv()
    robot = EnvironmentRobot(env, get_adapter("aloha"), control_hz=50)
    settings = LoopSettings(hz=50, buffer=BufferSettings(request_when_left=40))
    with zmq_server_thread(engine) as server, PolicyClient(server.endpoints["router"], "aloha-1") as client:
        summary = ControlLoop(robot, client, settings).run(1.0)
    assert summary["ticks"] == 50 and summary["chunks_received"] >= 1
    assert len(env.applied) == 50 and all(a.shape == (14,) for a in env.applied)
