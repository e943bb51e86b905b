"""Heartbeat timing of a fleet link, one side's view of its peer: when to send, when the peer is dead.

Both ends of a broker <-> worker link use it (the ZeroMQ guide's Paranoid Pirate rule): send a
HEARTBEAT every `interval_s`, count any message from the peer as a sign of life, and presume the peer
dead after `misses` intervals of silence. Time is passed in, never read here, so the rule is tested
by stepping a number, not by waiting.
"""

from __future__ import annotations

import dataclasses

DEFAULT_INTERVAL_S = 0.5
DEFAULT_MISSES = 3  # a dead peer is noticed after 1.5 s by default


@dataclasses.dataclass
class Liveness:
    interval_s: float
    misses: int
    last_heard: float
    next_send: float

    @classmethod
    def starting(cls, now: float, interval_s: float = DEFAULT_INTERVAL_S, misses: int = DEFAULT_MISSES) -> Liveness:
        if not (interval_s > 0 and misses >= 1):
            raise ValueError(f"heartbeat interval must be > 0 s and misses >= 1, got {interval_s}, {misses}")
        return cls(interval_s, misses, now, now)

    def heard(self, now: float) -> None:
        self.last_heard = now

    def dead(self, now: float) -> bool:
        return now - self.last_heard > self.interval_s * self.misses

    def send_due(self, now: float) -> bool:
        """Whether a HEARTBEAT is due now; if so, the next one is scheduled (drift-free)."""
        if now < self.next_send:
            return False
        self.next_send += self.interval_s
        if self.next_send <= now:  # the caller stalled: no burst of heartbeats to catch up
            self.next_send = now + self.interval_s
        return True

    def until_next(self, now: float) -> float:
        """Seconds until something is due: the next send or the peer's death."""
        return max(0.0, min(self.next_send, self.last_heard + self.interval_s * self.misses) - now)
