"""The `server` block of a `ping` reply (docs/protocol.md, sections 1 and 6).

A robot's health check reads the same block from a single server (`runtime.policy_server.service`)
and from a fleet's broker (`runtime.fleet.broker`), so both build it here: the name, version and
protocol are written once, and each side only says what it counts.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
from typing import Any

from transport.codec import PROTOCOL_VERSION

NAME = "pi05-runtime"


@functools.cache
def version() -> str:
    """The installed package's version ("unknown" when run from a tree that was never installed)."""
    try:
        return importlib.metadata.version(NAME)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServerInfo:
    uptime_s: float
    epoch: float  # changes when the server restarts: a robot counts a new one as a restart
    healthy: bool
    sessions: int
    refreshing: int  # robots with a refresh interval
    min_refresh_interval_s: float | None  # None: a broker without a worker does not know it
    # Sessions ended by silence and to make room: a single server's own; a broker leaves them out
    # (each of its workers counts its own).
    expired_sessions: int | None = None
    evicted_sessions: int | None = None

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "name": NAME,
            "version": version(),
            "protocol": PROTOCOL_VERSION,
            "uptime_s": self.uptime_s,
            "epoch": self.epoch,
            "healthy": self.healthy,
            "sessions": self.sessions,
            "refreshing": self.refreshing,
        }
        if self.expired_sessions is not None:
            wire["expired_sessions"] = self.expired_sessions
        if self.evicted_sessions is not None:
            wire["evicted_sessions"] = self.evicted_sessions
        wire["min_refresh_interval_s"] = self.min_refresh_interval_s
        return wire
