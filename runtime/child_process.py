"""The server's child processes (WebSocket gateways, fleet workers): how they end with it.

A child holds something of its parent's (a listening socket, a device, a place in the broker), so
it must neither outlive the parent nor keep it waiting at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """In the child: if the parent is killed, go at once (Linux's parent-death signal), or a port
    or a device stays taken and the parent's restart fails. Elsewhere than Linux this is a no-op
    and the child polls `os.getppid()` itself."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the signal was armed
        sys.exit(0)


async def stop(proc: asyncio.subprocess.Process | None, timeout_s: float) -> None:
    """In the parent: SIGTERM, then SIGKILL if the child has not exited within `timeout_s`."""
    if proc is None or proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), timeout_s)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
