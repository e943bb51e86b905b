"""A model repo in huggingface_hub's cache, written by huggingface_hub's own download.

No hub is reachable in the tests, so `hf://` checkpoints are read from a cache that
huggingface_hub's `snapshot_download` fills from a fake Hub on 127.0.0.1 (`fake_hub`) serving the
repo's files: blobs, snapshot links, refs and the commit's cached file tree are what a model LeRobot
downloaded has, laid out by huggingface_hub's code, not by a copy of it. The tests then read the
cache offline (`HF_HUB_OFFLINE=1`), as a user without network does.
"""

from __future__ import annotations

from pathlib import Path
from unittest import mock

from huggingface_hub import constants, snapshot_download

from tests.support import fake_hub

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(hub_cache: Path, repo_id: str, folder: Path, refs: tuple[str, ...] = ("main",)) -> Path:
    """`folder`'s files downloaded by huggingface_hub into `hub_cache` (`$HF_HOME/hub`) as the model
    repo `repo_id` at `COMMIT`, once per ref (a branch or tag naming that commit); its snapshot
    folder. Online for the download whatever HF_HUB_OFFLINE says (huggingface_hub reads it at
    import), with no token sent to the fake Hub."""
    with (
        fake_hub.serving(repo_id, folder, COMMIT, refs) as endpoint,
        mock.patch.object(constants, "HF_HUB_OFFLINE", False),
    ):
        snapshots = {
            snapshot_download(repo_id, revision=ref, cache_dir=hub_cache, endpoint=endpoint, token=False)
            for ref in refs
        }
    (snapshot,) = snapshots
    return Path(snapshot)
