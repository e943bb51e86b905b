"""`hf://OWNER/REPO[@REVISION]` from huggingface_hub's cache, offline.

No hub is reachable here, so the cache is written by huggingface_hub's own `snapshot_download`
from a fake Hub on 127.0.0.1 (`tests/support/hf_cache.py`), then read offline, and its own
`scan_cache_dir` must read it back as a complete repo: what a model LeRobot downloaded looks like.
The LeRobot fixture is the repo; its actions must match LeRobot's through `hf://` as through the
folder.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import jax.numpy as jnp
import numpy as np
import pytest
from huggingface_hub import constants as hf_constants

from configs import DEMO_MODEL, get_model_config
from policy import download, fixture, hub
from policy.engine.model_files import fetch_model_files
from policy.engine.settings import EngineSettings
from policy.model import pi05
from tests.support.hf_cache import COMMIT, cache_repo

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "lerobot_pi05_tiny"
REPO = "someone/pi05-tiny-finetune"


@pytest.fixture
def hf_home(tmp_path, monkeypatch) -> Path:
    """HF_HOME in tmp_path, offline, with the fixture's checkpoint cached as REPO (main and tag v1)."""
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(home / "hub"))  # read at import
    cache_repo(home / "hub", REPO, FIXTURE / "checkpoint", refs=("main", "v1"))
    return home


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_cache_is_laid_out_as_huggingface_hub_reads_it(hf_home):
    scanned = huggingface_hub.scan_cache_dir(hf_home / "hub")
    assert scanned.warnings == []
    (repo,) = scanned.repos
    assert repo.repo_id == REPO and repo.repo_type == "model"
    (revision,) = repo.revisions
    assert revision.commit_hash == COMMIT and revision.refs == frozenset({"main", "v1"})
    names = {f.file_name for f in revision.files}
    assert {"config.json", "model.safetensors", "policy_preprocessor.json", "policy_postprocessor.json"} <= names


def test_actions_through_hf_from_the_cache_match_lerobots(hf_home):
    files = fetch_model_files(get_model_config(DEMO_MODEL), EngineSettings(DEMO_MODEL, checkpoint_dir=f"hf://{REPO}"))
    snapshot = hf_home / "hub" / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
    assert files.checkpoint == snapshot and files.torch is not None
    assert files.torch.cfg.name == f"lerobot:hf://{REPO}" and files.torch.camera_aliases["front"] == "base_0_rgb"
    params = files.torch.load_params(jnp.float32)
    obs, noise, num_steps = fixture.load_inputs(FIXTURE / "inputs.npz", files.torch.cfg)
    actions = np.asarray(pi05.sample_actions_jit(params, obs, noise, jnp.int32(num_steps), files.torch.cfg))
    with np.load(FIXTURE / "expected.npz") as expected:
        err = float(np.abs(actions - expected["actions"]).max())
    print(f"max abs error vs LeRobot's float32 actions through hf://: {err:.3e}")
    assert err <= 1e-4


def test_a_revision_is_a_ref_of_the_cache(hf_home):
    assert hub.snapshot(f"hf://{REPO}@v1", weights=True).name == COMMIT
    with pytest.raises(download.DownloadError, match=f"^hf://{REPO}@v2 is not in the Hugging Face cache"):
        hub.snapshot(f"hf://{REPO}@v2", weights=False)


def test_replay_takes_an_hf_checkpoint_in_a_fresh_process(hf_home, tmp_path):
    """The command line as a user runs it: HF_HOME and HF_HUB_OFFLINE read from the environment."""
    out = tmp_path / "out.npz"
    result = subprocess.run(
        [sys.executable, "-m", "policy.replay", str(FIXTURE), "--checkpoint", f"hf://{REPO}", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    err = float(re.search(r"max abs error vs expected actions: (\S+)", result.stdout)[1])
    assert err <= 1e-4


def test_a_repo_not_in_the_cache_offline_is_named_with_how_to_fetch_it(hf_home):
    with pytest.raises(download.DownloadError) as refused:
        hub.snapshot("hf://nobody/missing@v3", weights=False)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("hf://nobody/missing@v3 is not in the Hugging Face cache and HF_HUB_OFFLINE is set; ")
    assert "`hf download nobody/missing --revision v3`" in message


def test_an_unreachable_hub_fails_at_once_or_uses_the_cached_copy(hf_home, monkeypatch):
    """Not offline, but the hub's host refuses: a repo not cached is one line from the probe (no
    retries of huggingface_hub's), a cached one is served from the cache."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    port = _closed_port()
    monkeypatch.setattr(hf_constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(download.DownloadError) as refused:
        hub.snapshot("hf://nobody/missing", weights=False)
    assert str(refused.value).startswith(f"cannot reach hf://nobody/missing (127.0.0.1:{port}: ")
    assert "`hf download nobody/missing`" in str(refused.value)
    assert hub.snapshot(f"hf://{REPO}", weights=True).name == COMMIT


@pytest.mark.parametrize("location", ["hf://just-a-name", "hf://a/b/c", "hf://a/b@", "hf:/a/b"])
def test_a_malformed_location_says_what_one_looks_like(location):
    with pytest.raises(ValueError, match=r"expected hf://OWNER/REPO\[@REVISION\]"):
        hub.parse(location)
