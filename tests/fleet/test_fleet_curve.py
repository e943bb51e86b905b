"""CURVE through a fleet (`--workers 2` with `--curve-secret/--curve-clients`): the broker's front
sockets authenticate as a single server's do, and each robot's key travels to its worker, which binds
the session and refresh topic to it."""

from __future__ import annotations

import time

import numpy as np
import pytest

from tests.support.keys import any_reply, make_keys
from tests.support.server_process import ServerProcess
from transport.zmq_client import PolicyClient

CAP_S = 60.0  # failure detection only
IMAGES = {"base_0_rgb": np.zeros((8, 8, 3), np.uint8)}


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return make_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def fleet(keys):
    server = ServerProcess(
        "--workers", "2", "--fixed-reply", "--heartbeat", "0.2", *keys.server_flags(), gateways=False
    )
    server.start(CAP_S)
    yield server
    server.stop()


def test_only_allowed_keys_reach_the_workers(fleet, keys):
    assert not any_reply(fleet.router, None), "a client without a key was answered"
    assert not any_reply(fleet.router, keys.client("stranger")), "a key not on the list was answered"
    with PolicyClient(fleet.router, "arm", keys=keys.client("robot-a"), timeout_s=10) as client:
        assert client.infer(IMAGES, "go")["actions"].shape[0] > 0
        assert client.bye()["dropped"]


def test_each_key_has_its_own_session_and_refreshes_under_one_robot_name(fleet, keys):
    """Two keys name the same robot: two sessions (placed apart, as two robots), each key hears only
    its own refreshes."""
    received: dict[str, list[str]] = {"robot-a": [], "robot-b": []}
    clients = {name: PolicyClient(fleet.router, "twin", keys=keys.client(name), timeout_s=10) for name in received}
    try:
        for name, client in clients.items():
            client.listen_refreshes(fleet.pub, lambda m, name=name: received[name].append(m["robot"]))
            client.set_refresh(0.2, IMAGES, f"task of {name}")
        placement = {w["name"]: w["robots"] for w in clients["robot-a"].ping()["broker"]["workers"]}
        assert placement == {"cpu0": 1, "cpu1": 1}
        deadline = time.monotonic() + CAP_S
        while not all(len(seen) >= 3 for seen in received.values()):
            assert time.monotonic() < deadline, received
            for client in clients.values():
                client.poll(0.02)
        for name, seen in received.items():
            assert set(seen) == {f"{keys.client(name).user}/twin"}
    finally:
        for client in clients.values():
            client.close()
