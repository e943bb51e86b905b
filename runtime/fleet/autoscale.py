"""When a Ray fleet adds or removes a replica (`--min-replicas`/`--max-replicas`): by load, on a clock
that tests inject.

A replica is added when requests wait too long for a sustained time: the median time the broker holds
a request (sent to a worker until its reply) stays above `wait_ms` for `sustain_s`. One is removed
when it has had nothing to do: a replica the broker routed no request to for `idle_s`, while the
fleet is not slow. Never below `min_replicas` nor above `max_replicas`, and no decision within
`cooldown_s` of the last one (a new replica needs time to load and compile before it relieves
anyone). Each decision carries its reason, for the log. The cluster's own autoscaler then adds or
frees the machines the replicas need.
"""

from __future__ import annotations

import collections
import dataclasses
import statistics
import threading
import time
from collections.abc import Callable, Mapping


@dataclasses.dataclass(frozen=True)
class ScaleRule:
    min_replicas: int
    max_replicas: int
    wait_ms: float = 500.0
    sustain_s: float = 30.0
    idle_s: float = 300.0
    cooldown_s: float = 60.0

    def __post_init__(self) -> None:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"need 1 <= min_replicas <= max_replicas, got {self.min_replicas}, {self.max_replicas}")
        if min(self.wait_ms, self.sustain_s, self.idle_s, self.cooldown_s) < 0:
            raise ValueError("the scale rule's times must be >= 0")


@dataclasses.dataclass(frozen=True)
class Decision:
    action: str  # "add" or "remove"
    reason: str
    replica: str | None = None  # the one to remove


class Autoscaler:
    """`observe(seconds)` from the broker's thread (each answered request's time at a worker);
    `decide(routed, replicas)` from the front host's loop: `routed` holds each joined replica's
    requests so far, `replicas` counts them all (those still starting too)."""

    def __init__(self, rule: ScaleRule, clock: Callable[[], float] = time.monotonic):
        self.rule = rule
        self._clock = clock
        self._lock = threading.Lock()
        self._recent: collections.deque[float] = collections.deque(maxlen=4096)
        self._slow_since: float | None = None
        self._last_decision = -float("inf")
        self._last_routed: dict[str, tuple[int, float]] = {}  # replica -> (routed, since when unchanged)

    def observe(self, seconds: float) -> None:
        with self._lock:
            self._recent.append(seconds)

    def decide(self, routed: Mapping[str, int], replicas: int | None = None) -> Decision | None:
        now = self._clock()
        with self._lock:
            recent, self._recent = list(self._recent), collections.deque(maxlen=4096)
        median_ms = statistics.median(recent) * 1e3 if recent else 0.0
        slow = median_ms > self.rule.wait_ms
        self._slow_since = (self._slow_since if self._slow_since is not None else now) if slow else None
        idle = self._idle(routed, now)
        if now - self._last_decision < self.rule.cooldown_s:
            return None
        replicas = len(routed) if replicas is None else replicas
        decision = None
        if slow and now - self._slow_since >= self.rule.sustain_s and replicas < self.rule.max_replicas:
            decision = Decision(
                "add",
                f"requests waited {median_ms:.0f} ms at the median (over {self.rule.wait_ms:g} ms) for "
                f"{now - self._slow_since:.0f} s",
            )
        elif not slow and replicas > self.rule.min_replicas and idle:
            name, for_s = idle
            decision = Decision("remove", f"{name} was routed no request for {for_s:.0f} s", name)
        if decision is not None:
            self._last_decision = now
            self._slow_since = None
        return decision

    def _idle(self, routed: Mapping[str, int], now: float) -> tuple[str, float] | None:
        """The replica idle the longest, if one has been for `idle_s` (its routed count unchanged)."""
        for name, count in routed.items():
            last = self._last_routed.get(name)
            if last is None or last[0] != count:
                self._last_routed[name] = (count, now)
        for gone in set(self._last_routed) - set(routed):
            del self._last_routed[gone]
        name, (_, since) = min(self._last_routed.items(), key=lambda item: item[1][1], default=(None, (0, now)))
        return (name, now - since) if name is not None and now - since >= self.rule.idle_s else None
