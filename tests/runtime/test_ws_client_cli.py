"""`python -m transport.ws_client` against the real server's JSON API (tiny model, 127.0.0.1)."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.support.ports import free_local_ports
from tests.support.server_thread import ServerThread
from transport import ws_client

REPLY = re.compile(r"round trip ([\d.]+) ms \| server_timing ([\d.]+) ms \| timing ([\d.]+) ms")


def _json_server(engine) -> ServerThread:
    router, pub, ws = free_local_ports(3)
    argv = ["--router-port", str(router), "--pub-port", str(pub), "--ws-port", str(ws), "--openpi-port", "0"]
    return ServerThread(argv, backend=engine)


def test_random_images_in_batches_print_each_reply_and_the_timing_statistics(engine, capsys):
    with _json_server(engine) as server:
        code = ws_client.main(
            ["--url", server.endpoints["json websocket"], "--random-images", "--repeat", "2", "--batch", "2",
             "--max-decoding-steps", "3", "--seed", "1"]
        )  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "WARNING: --random-images: sending random noise" in err
    replies = [line for line in out.splitlines() if line.startswith("reply ")]
    assert [line.split(":")[0] for line in replies] == [
        "reply 1/2 [0]",
        "reply 1/2 [1]",
        "reply 2/2 [0]",
        "reply 2/2 [1]",
    ]
    for line in replies:
        assert "actions (1, 50, 32)" in line and "subtask '" in line
        round_trip, server_ms, engine_ms = map(float, REPLY.search(line).groups())
        assert round_trip >= server_ms >= engine_ms > 0  # each includes the next
    stats = out[out.index("timing:") :]
    assert re.search(r"client round trip\s+p50 .* \(n=2\)", stats)  # one round trip per batch message
    assert re.search(r"server_timing.total\s+p50 .* \(n=4\)", stats)
    assert re.search(r"timing.total\s+p50 .* \(n=4\)", stats) and "timing.action" in stats


def test_image_files_and_npy_per_camera_with_a_state(engine, capsys, tmp_path):
    rng = np.random.default_rng(0)
    png, npy = tmp_path / "front.png", tmp_path / "wrist.npy"
    Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(png)
    np.save(npy, rng.integers(0, 256, (96, 128, 3), dtype=np.uint8))
    with _json_server(engine) as server:
        code = ws_client.main(
            ["--url", server.endpoints["json websocket"], "--image", f"base_0_rgb={png}",
             "--image", f"left_wrist_0_rgb={npy}", "--state", "0.1,-0.2,0.3", "--no-subtask", "--prompt", "sort"]
        )  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "random" not in err
    (reply,) = [line for line in out.splitlines() if line.startswith("reply ")]
    assert reply.startswith("reply 1/1: subtask None | actions (1, 50, 32)")


def test_refreshes_are_printed_as_they_arrive(engine, capsys):
    with _json_server(engine) as server:
        code = ws_client.main(
            ["--url", server.endpoints["json websocket"], "--random-images", "--max-decoding-steps", "3",
             "--refresh", "0.3", "--refreshes", "2"]
        )  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    refreshes = [line for line in out.splitlines() if line.startswith("refresh ")]
    assert [line.split(":")[0] for line in refreshes] == ["refresh 1", "refresh 2"]
    assert all("subtask '" in line for line in refreshes)
    assert "refreshes received: 2" in out


def test_images_are_required_and_checked(capsys, tmp_path):
    with pytest.raises(SystemExit) as neither:
        ws_client.main(["--url", "ws://127.0.0.1:1"])
    assert neither.value.code == 2
    assert "give --image CAMERA=PATH (once per camera) or --random-images" in capsys.readouterr().err
    with pytest.raises(SystemExit) as missing:
        ws_client.main(["--url", "ws://127.0.0.1:1", "--image", f"base_0_rgb={tmp_path / 'nope.png'}"])
    assert missing.value.code == 2
    assert f"--image base_0_rgb={tmp_path / 'nope.png'}: image file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ws_client.main(["--url", "ws://127.0.0.1:1", "--image", "base_0_rgb"])
    assert "expected CAMERA=PATH, got 'base_0_rgb'" in capsys.readouterr().err


def test_no_server_is_one_error_line():
    (port,) = free_local_ports(1)
    result = subprocess.run(
        [sys.executable, "-m", "transport.ws_client", "--url", f"ws://127.0.0.1:{port}", "--random-images"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if not line.startswith("WARNING: --random-images")]
    assert len(errors) == 1 and errors[0].startswith(f"error: cannot connect to ws://127.0.0.1:{port}")
    assert "Traceback" not in result.stderr
