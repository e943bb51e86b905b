"""`python -m policy.replay` on the bundled fixture."""

from __future__ import annotations

import numpy as np

from policy import replay


def test_replay_writes_actions_and_reports_error(tmp_path, fixture_dir, expected, capsys):
    out = tmp_path / "out.npz"
    assert replay.main([str(fixture_dir), "--out", str(out), "--log-level", "WARNING"]) == 0
    with np.load(out) as f:
        assert f["actions"].shape == (1, 50, 32)
        err = float(np.abs(f["actions"] - expected["actions"]).max())
        np.testing.assert_array_equal(f["decode_tokens"], expected["decode_tokens"])
    assert err <= 1e-4
    printed = capsys.readouterr().out
    assert "max abs error vs expected actions:" in printed
    reported = float(printed.split("max abs error vs expected actions:")[1].split()[0])
    assert abs(reported - err) < 1e-9
    assert "greedy decode tokens match expected: True" in printed


def test_replay_missing_folder_is_a_clear_error(tmp_path, caplog):
    assert replay.main([str(tmp_path / "missing"), "--out", str(tmp_path / "o.npz")]) == 2
    assert "fixture config not found" in caplog.text
