"""A model repo in huggingface_hub's cache, laid out offline as huggingface_hub lays it.

No hub is reachable in the tests, so `hf://` checkpoints are served from a cache built here: blobs
named by their sha256, a snapshot folder per commit linking to them, refs naming the commit of a
branch or tag. What a model LeRobot downloaded looks like, and what `scan_cache_dir` reads back.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(hub_cache: Path, repo_id: str, folder: Path, refs: tuple[str, ...] = ("main",)) -> Path:
    """`folder`'s files as huggingface_hub caches a model repo at `COMMIT` under `hub_cache`
    (`$HF_HOME/hub`), each ref naming that commit; its snapshot folder."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(COMMIT)
    return snapshot
