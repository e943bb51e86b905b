"""`python -m robots.run` with CURVE keys: the control loop is served and gets its refreshes on its
own `user/robot` topic; a robot whose key is not allowed is told so in one line."""

from __future__ import annotations

import json

import pytest

from robots import run as robots_run
from runtime.policy_server.fixed_backend import FixedBackend
from tests.support.keys import make_keys
from tests.support.serving import zmq_server_thread


def _key_flags(keys, name: str) -> list[str]:
    return ["--curve-server-key", str(keys.root / "server.key"), "--curve-key", str(keys.root / f"{name}.key_secret")]


def test_the_control_loop_runs_and_refreshes_under_curve(tmp_path, capsys):
    keys = make_keys(tmp_path)
    out = tmp_path / "stats.json"
    with zmq_server_thread(FixedBackend(), *keys.server_flags()) as server:
        endpoints = ["--server", server.endpoints["router"], "--pub", server.endpoints["pub"]]
        code = robots_run.main(
            [*endpoints, *_key_flags(keys, "robot-a"), "--hz", "50", "--duration", "1.5", "--subtask", "refresh",
             "--refresh-interval", "0.2", "--stats-json", str(out), "--log-level", "WARNING"]
        )  # fmt: skip
        refused = robots_run.main(
            [*endpoints, *_key_flags(keys, "stranger"), "--duration", "1", "--connect-timeout", "1",
             "--log-level", "ERROR"]
        )  # fmt: skip
    assert code == 0
    stats = json.loads(out.read_text())
    assert stats["chunks_received"] >= 1 and stats["outages"] == 0
    assert stats["refresh_count"] >= 1, "no refresh reached the robot on its user/robot topic"
    assert refused == 1
    assert "refused this client's CURVE key" in capsys.readouterr().err


def test_key_flags_go_together(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        robots_run.main(["--curve-key", str(tmp_path / "robot.key_secret")])
    assert info.value.code == 2
    assert "--curve-server-key and --curve-key go together" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        robots_run.main(_key_flags(make_keys(tmp_path), "missing"))
    assert "missing.key_secret: no such key file" in capsys.readouterr().err
