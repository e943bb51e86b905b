"""Watching processes from outside: a test that kills a server checks its children went with it."""

from __future__ import annotations

from collections.abc import Sequence

from tests.support.eventually import eventually


def wait_pids_gone(pids: Sequence[int], timeout_s: float) -> list[int]:
    """The pids among `pids` still running after up to `timeout_s` (zombies count as gone)."""
    eventually(lambda: not any(_running(p) for p in pids), timeout_s, step_s=0.05)
    return [p for p in pids if _running(p)]


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
