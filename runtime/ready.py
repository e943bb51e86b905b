"""Telling whoever started the server that it serves: a ready file and systemd's notification.

Readiness is a contract, not a log line's wording: `--ready-file PATH` is written once every endpoint
answers, atomically (a reader sees no file or the whole JSON: pid, role, endpoints by name, model),
and removed at exit; under systemd (`Type=notify`, `NOTIFY_SOCKET` set) `READY=1` is sent at the
same moment and `STOPPING=1` when shutting down (docs/operations.md has a unit file). Tests,
benchmarks and the front host wait on these.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def sd_notify(state: str) -> bool:
    """Sends `state` (e.g. "READY=1") to the service manager; False when none listens."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as e:
        log.warning("could not notify the service manager at %r: %s", os.environ["NOTIFY_SOCKET"], e)
        return False
    return True


def write_ready_file(path: str | os.PathLike, info: dict[str, Any]) -> None:
    """Writes `info` as JSON to `path` through a temporary file in the same folder and a rename."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(info, f, indent=1, sort_keys=True)
            f.write("\n")
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class Readiness:
    """`ready(info)` once serving, `stopping()` at shutdown; both are safe to call without a ready
    file or a service manager."""

    def __init__(self, ready_file: str | None):
        self.ready_file = ready_file
        self.announced = False

    def ready(self, info: dict[str, Any]) -> None:
        info = {"pid": os.getpid(), **info}
        if self.ready_file:
            write_ready_file(self.ready_file, info)
        status = info.get("model", {}).get("label", "")
        sd_notify("READY=1\nSTATUS=serving" + (f" {status}" if status else ""))
        self.announced = True

    def stopping(self) -> None:
        if self.announced:
            sd_notify("STOPPING=1")
        if self.ready_file:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.ready_file)
