"""The Ray fleet's scale-by-load rule on an injected clock: a replica added after requests waited too
long for the sustained time (not before), one removed after it was idle, never past the bounds, never
twice within the cooldown."""

from __future__ import annotations

import argparse
import asyncio
import types

import pytest

from runtime.fleet.autoscale import Autoscaler, Decision, ScaleRule
from runtime.fleet.ray_front import RayFleet
from runtime.fleet.ray_front import rule as rule_of
from runtime.robot.virtual_time import VirtualClock

RULE = ScaleRule(min_replicas=1, max_replicas=3, wait_ms=100.0, sustain_s=30.0, idle_s=120.0, cooldown_s=60.0)
START = 1000.0


class Fleet:
    """Replicas as the front host sees them: each one's routed count, applied decisions, a clock."""

    def __init__(self, *names: str):
        self.clock = VirtualClock(START)
        self.scaler = Autoscaler(RULE, self.clock)
        self.routed = dict.fromkeys(names, 0)
        self.decisions: list[tuple[float, Decision]] = []

    def run(self, seconds: int, wait_s: float, busy: tuple[str, ...] = ()) -> list[tuple[float, Decision]]:
        """One-second ticks: requests that waited `wait_s` each, routed to the `busy` replicas."""
        made = []
        for _ in range(seconds):
            self.clock.advance(1.0)
            for name in busy:
                self.routed[name] += 1
            for _ in range(5):
                self.scaler.observe(wait_s)
            decision = self.scaler.decide(self.routed)
            if decision is None:
                continue
            made.append((self.clock() - START, decision))
            if decision.action == "add":
                self.routed[f"new-{len(self.routed)}"] = 0
            else:
                del self.routed[decision.replica]
        self.decisions += made
        return made


def test_a_replica_is_added_only_after_the_wait_was_sustained():
    fleet = Fleet("a")
    assert fleet.run(30, wait_s=0.5) == []  # slow from the first tick, for 29 s so far
    ((at, decision),) = fleet.run(1, wait_s=0.5)
    assert (decision.action, at) == ("add", 31.0)
    assert "500 ms at the median (over 100 ms) for 30 s" in decision.reason


def test_a_short_slow_spell_adds_nothing():
    fleet = Fleet("a")
    assert fleet.run(20, wait_s=0.5) == []
    assert fleet.run(1, wait_s=0.01) == []  # fast again: the spell is over
    assert fleet.run(30, wait_s=0.5) == []  # and the next one counts from its own start


def test_adding_waits_out_the_cooldown_and_stops_at_the_maximum():
    fleet = Fleet("a")
    made = fleet.run(300, wait_s=0.5, busy=("a",))
    assert [(at, d.action) for at, d in made] == [(31.0, "add"), (91.0, "add")]  # 60 s apart, then 3 = max
    assert len(fleet.routed) == RULE.max_replicas


def test_an_idle_replica_is_removed_but_never_below_the_minimum():
    fleet = Fleet("a", "b")
    ((at, decision),) = fleet.run(400, wait_s=0.01, busy=("a",))
    assert (decision.action, decision.replica, at) == ("remove", "b", 121.0)
    assert "b was routed no request for 120 s" in decision.reason
    assert fleet.run(1000, wait_s=0.01) == []  # "a" idle too now, but it is the minimum


def test_a_slow_fleet_removes_nobody():
    fleet = Fleet("a", "b", "c")
    made = fleet.run(400, wait_s=0.5, busy=("a",))
    assert all(d.action != "remove" for _, d in made)


def test_the_rule_refuses_impossible_bounds():
    with pytest.raises(ValueError, match="min_replicas <= max_replicas"):
        ScaleRule(min_replicas=3, max_replicas=2)


class _Worker:
    def __init__(self, name: str):
        self.name, self.routed = name, 0


class _Replicas:
    """`RayReplicas` as the scaling loop uses it: slots, add, remove (no Ray)."""

    def __init__(self, slots: int):
        self.actors = dict.fromkeys(range(slots))
        self.removed: list[int] = []

    def add(self) -> int:
        slot = next(i for i in range(8) if i not in self.actors)
        self.actors[slot] = None
        return slot

    def remove(self, slot: int) -> None:
        del self.actors[slot]
        self.removed.append(slot)


def test_the_front_hosts_scaling_step_adds_and_removes_ray_replicas_by_slot(caplog):
    """`RayFleet.scale_once` on the rule's clock: a sustained wait adds a replica in the free slot,
    an idle joined replica is removed by the slot its name carries, each logged with its reason."""
    args = argparse.Namespace(replicas=2, min_replicas=1, max_replicas=3, scale_wait_ms=100.0, scale_sustain_s=30.0,
                              scale_idle_s=120.0)  # fmt: skip
    fleet = RayFleet(args, [], [])
    clock = VirtualClock(START)
    fleet.autoscaler = Autoscaler(rule_of(args), clock)
    workers = {b"a": _Worker("ray-0@10.0.0.7"), b"b": _Worker("ray-1@10.0.0.8")}
    fleet.broker = types.SimpleNamespace(table=types.SimpleNamespace(workers=workers))
    fleet.replicas = _Replicas(2)

    async def seconds(n: int, wait_s: float, busy: tuple[bytes, ...]) -> list[Decision]:
        made = []
        for _ in range(n):
            clock.advance(1.0)
            for key in busy:
                workers[key].routed += 1
            fleet.autoscaler.observe(wait_s)
            decision = await fleet.scale_once()
            if decision is not None:
                made.append(decision)
        return made

    with caplog.at_level("INFO", logger="runtime.fleet.ray_front"):
        (added,) = asyncio.run(seconds(31, 0.5, busy=(b"a", b"b")))
        assert added.action == "add" and sorted(fleet.replicas.actors) == [0, 1, 2]
        (removed,) = asyncio.run(seconds(130, 0.01, busy=(b"a",)))
    assert removed.replica == "ray-1@10.0.0.8" and fleet.replicas.removed == [1]
    assert "scaling: adding replica ray-2: requests waited 500 ms" in caplog.text
    assert "scaling: removing replica ray-1: ray-1@10.0.0.8 was routed no request for 120 s" in caplog.text
