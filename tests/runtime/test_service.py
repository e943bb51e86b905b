"""PolicyService rules, without sockets: validate then commit, bounded sessions, expiry of robots
that are gone (on an injected clock), `bye`, and what `ping` reports."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest

from policy.request import ChunkGuidance, InferenceRequest, Observation, Options
from runtime.policy_server.fixed_backend import FixedBackend
from runtime.policy_server.service import PolicyService, ServiceLimits
from runtime.robot.virtual_time import VirtualClock
from transport.errors import BadRequest, TransportError
from transport.messages import BYE, INFER, KEEP, PING, Request


def _obs(camera: str = "base_0_rgb") -> Observation:
    return Observation({camera: np.zeros((224, 224, 3), np.uint8)})


def _infer(robot: str, obs: Observation | None = None, interval=KEEP) -> Request:
    return Request(INFER, 1, robot, "go", Options(generate_subtask=False), interval, obs or _obs())


def _service(limits: ServiceLimits | None = None, subscribers=lambda topic: 0):
    clock = VirtualClock(100.0)
    published: list[tuple[str, dict]] = []

    async def publish(topic: str, message: dict) -> None:
        published.append((topic, message))

    forgotten: list[str] = []
    service = PolicyService(FixedBackend(), publish, subscribers, forgotten.append, limits, clock)
    return service, clock, published, forgotten


def test_a_rejected_request_changes_nothing():
    async def scenario():
        service, _, _, _ = _service(ServiceLimits(min_refresh_interval_s=0.5))
        await service.handle("p", _infer("arm"))
        before = service.sessions["arm"].observation
        with pytest.raises(BadRequest, match="subtask_refresh_interval"):
            await service.handle("p", _infer("arm", interval=0.1))  # below the server's minimum
        with pytest.raises(ValueError, match="unknown camera"):
            await service.handle("p", _infer("arm", _obs("nose_cam"), interval=1.0))
        with pytest.raises(BadRequest, match="subtask_refresh_interval"):
            await service.handle("p", _infer("new-robot", interval=0.2))
        session = service.sessions["arm"]
        assert session.observation is before
        assert service.scheduler.active() == 0
        assert "new-robot" not in service.sessions
        await service.close()

    asyncio.run(scenario())


def test_session_bounds_recover_per_principal_and_in_all():
    """Past a bound a new robot is served and an old session ends instead: its own principal's least
    recently seen at that principal's cap, else (the table full) one of the principal holding the
    most, sessions without a listener first. Nothing locks the table, refreshing sessions included."""
    listening = {"r2": 1}

    async def scenario():
        limits = ServiceLimits(max_sessions=5, max_sessions_per_peer=3)
        service, clock, _, forgotten = _service(limits, subscribers=lambda topic: listening.get(topic, 0))
        for robot in ("r1", "r2", "r3"):
            await service.handle("10.0.0.1", _infer(robot, interval=1.0))
            clock.advance(1)
        await service.handle("10.0.0.1", _infer("r4"))  # at its cap: its least recently seen goes
        assert set(service.sessions) == {"r2", "r3", "r4"} and forgotten == ["r1"]
        for robot in ("r5", "r6"):
            await service.handle("10.0.0.2", _infer(robot))
            clock.advance(1)
        await service.handle("10.0.0.3", _infer("r7"))  # table full: the largest holder gives one up
        # r2 is older but has a listener on its refresh topic: r3 goes.
        assert set(service.sessions) == {"r2", "r4", "r5", "r6", "r7"} and forgotten[-1] == "r3"
        assert service.sessions["r7"].principal == "10.0.0.3"
        assert service.evicted == 2 and service.ping()["server"]["evicted_sessions"] == 2
        assert service.scheduler.interval("r3") is None  # its refresh ended with it
        await service.close()

    asyncio.run(scenario())


def test_with_the_table_full_of_one_session_clients_a_listening_robot_is_not_the_one_to_go():
    """1024 addresses holding one session each tie for the most: the session that gives way is
    chosen among all of theirs (no listener first, then the least recently heard), not the first
    client in the table's order."""
    listening = {"victim": 1}

    async def scenario():
        service, clock, _, forgotten = _service(
            ServiceLimits(max_sessions=4), subscribers=lambda topic: listening.get(topic, 0)
        )
        await service.handle("10.0.0.1", _infer("victim", interval=1.0))
        for i in range(3):
            clock.advance(1)
            await service.handle(f"10.0.1.{i}", _infer(f"a{i}", interval=1.0))
        clock.advance(1)
        await service.handle("10.0.2.0", _infer("newcomer"))
        assert forgotten == ["a0"] and "victim" in service.sessions
        await service.close()

    asyncio.run(scenario())


def test_a_session_whose_request_is_being_served_is_not_taken_for_a_new_robot():
    """Its robot waits for that reply: the newcomer gets `busy` instead, and is served once the
    request is answered (within the engine's deadline, so the table is never locked for long)."""

    async def scenario():
        clock = VirtualClock(100.0)
        service = PolicyService(
            FixedBackend(delay_s=0.2), _publish_nothing, limits=ServiceLimits(max_sessions_per_peer=1), clock=clock
        )
        running = asyncio.create_task(service.handle("10.0.0.1", _infer("r1")))
        while "r1" not in service._running:
            await asyncio.sleep(0.01)
        with pytest.raises(TransportError, match="all have requests being served") as e:
            await service.handle("10.0.0.1", _infer("r2"))
        assert e.value.code == "busy" and set(service.sessions) == {"r1"}
        _, arrays = await running
        assert arrays["actions"].shape[0] > 0  # r1's robot got its reply
        await service.handle("10.0.0.1", _infer("r2"))
        assert set(service.sessions) == {"r2"}
        await service.close()

    asyncio.run(scenario())


async def _publish_nothing(topic: str, message: dict) -> None:
    pass


def test_a_refreshing_robot_without_subscriber_expires_after_a_few_intervals():
    """Silent and without a listener for 3 intervals (looked at every 0.5 s, as the server does); a
    listener that is missing for a moment only (it connects again) keeps its session."""
    listening = {"stays": 1, "blinks": 1}

    async def scenario():
        limits = ServiceLimits(expiry_intervals=3.0, min_expiry_s=2.0, session_ttl_s=600.0)
        service, clock, _, forgotten = _service(limits, subscribers=lambda topic: listening.get(topic, 0))
        for robot in ("gone", "stays", "blinks", "idle"):
            await service.handle("p", _infer(robot, interval=1.0 if robot != "idle" else KEEP))
        expired = []
        for step in range(1, 13):  # 6 s of looks every 0.5 s
            clock.advance(0.5)
            listening["blinks"] = 0 if step in (8, 9) else 1  # its SUB reconnects: gone for 1 s
            expired.append((step * 0.5, service.expire()))
        assert [(t, keys) for t, keys in expired if keys] == [(3.5, ["gone"])]  # 3 s after its first look
        assert forgotten == ["gone"]
        assert service.ping()["server"]["refreshing"] == 2 and service.scheduler.interval("gone") is None
        clock.advance(600)
        assert sorted(service.expire()) == ["blinks", "idle", "stays"]  # silence past the TTL ends any session
        assert service.sessions == {} and service.expired == 4
        await service.close()

    asyncio.run(scenario())


def test_bye_ends_the_session_and_its_refresh():
    async def scenario():
        service, _, _, forgotten = _service()
        await service.handle("p", _infer("arm", interval=1.0))
        assert service.ping()["server"]["refreshing"] == 1
        data, _ = await service.handle("p", Request(BYE, 2, "arm"))
        assert data == {"dropped": True}
        pong, _ = await service.handle("p", Request(PING, 3, "arm"))
        assert pong["server"]["refreshing"] == 0 and pong["server"]["sessions"] == 0
        assert forgotten == ["arm"]
        await service.close()

    asyncio.run(scenario())


def test_infer_without_observation_uses_the_stored_one_and_without_prompt_is_refused():
    async def scenario():
        service, _, _, _ = _service()
        with pytest.raises(BadRequest, match="no observation"):
            await service.handle("p", Request(INFER, 1, "arm", "go", Options(generate_subtask=False)))
        await service.handle("p", _infer("arm"))
        _, arrays = await service.handle("p", Request(INFER, 2, "arm", "go", Options(generate_subtask=False)))
        assert arrays["actions"].shape == (50, 32)
        with pytest.raises(BadRequest, match="high_level_prompt"):
            await service.handle("p", Request(INFER, 3, "arm", None, Options()))
        await service.close()

    asyncio.run(scenario())


def test_a_session_that_ends_takes_its_running_requests_with_it():
    class Stuck(FixedBackend):
        def __init__(self) -> None:
            super().__init__()
            self.started = asyncio.Event()
            self.cancelled = 0

        async def submit(self, request):
            self.started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise

    async def scenario():
        backend = Stuck()
        service = PolicyService(backend, lambda topic, message: asyncio.sleep(0))
        running = asyncio.create_task(service.handle("p", _infer("arm")))
        await backend.started.wait()
        await service.handle("p", Request(BYE, 2, "arm"))  # e.g. the gateway's connection closed
        with pytest.raises(asyncio.CancelledError):
            await running
        await service.close()
        return backend.cancelled

    assert asyncio.run(scenario()) == 1


def test_a_refresh_the_engine_could_not_run_is_refused_up_front():
    class Limited(FixedBackend):
        def check(self, request):
            super().check(request)
            if request.kind == "subtask" and request.options.max_decoding_steps > 12:
                raise ValueError("max_decoding_steps must be in 1..12")

    async def scenario():
        service = PolicyService(Limited(), lambda topic, message: asyncio.sleep(0))
        await service.handle("p", _infer("arm"))  # action-only: the decoding budget does not matter
        with pytest.raises(ValueError, match="max_decoding_steps"):  # but every refresh would fail
            await service.handle("p", _infer("arm", interval=1.0))
        assert service.scheduler.active() == 0
        await service.close()

    asyncio.run(scenario())


def test_pipelined_requests_of_one_robot_each_answer_for_their_own_observation():
    class Slow(FixedBackend):
        async def submit(self, request):
            await asyncio.sleep(0.01)  # the second request arrives while the first waits
            return await super().submit(request)

    async def scenario():
        service = PolicyService(Slow(), lambda topic, message: asyncio.sleep(0))
        first = dataclasses.replace(_infer("arm"), observation=dataclasses.replace(_obs(), timestamp=1.0))
        second = dataclasses.replace(_infer("arm"), observation=dataclasses.replace(_obs(), timestamp=2.0))
        replies = await asyncio.gather(service.handle("p", first), service.handle("p", second))
        await service.close()
        return [data["obs_timestamp"] for data, _ in replies]

    assert asyncio.run(scenario()) == [1.0, 2.0]


@pytest.mark.parametrize(
    ("guidance", "field"),
    [
        (ChunkGuidance(np.zeros((3, 7)), 1, 2), "prev_actions"),
        (ChunkGuidance(np.full((3, 32), np.nan), 1, 2), "prev_actions"),
        (ChunkGuidance(np.zeros((3, 32)), 30, 2), "inference_delay"),
        (ChunkGuidance(np.zeros((3, 32)), 2, 1), "execute_horizon"),
        (ChunkGuidance(np.zeros((3, 32)), 1, 2, schedule="cosine"), "schedule"),  # type: ignore[arg-type]
        (ChunkGuidance(np.zeros((3, 32)), 1, 2, max_guidance_weight=1e9), "max_guidance_weight"),
    ],
)
def test_the_fixed_backend_checks_guidance_like_the_engine(guidance, field):
    """The wiring backend must refuse what the engine refuses, or a robot passes tests against it
    and fails against the model."""
    backend = FixedBackend("pi05_tiny")
    request = InferenceRequest(Observation({"base_0_rgb": np.zeros((8, 8, 3), np.uint8)}), "go", guidance=guidance)
    with pytest.raises(ValueError, match=field):
        backend.check(request)
    backend.check(dataclasses.replace(request, guidance=ChunkGuidance(np.zeros((3, 32)), 1, 2)))
    with pytest.raises(ValueError, match="subtask-only"):
        backend.check(dataclasses.replace(request, kind="subtask", guidance=ChunkGuidance(np.zeros((3, 32)), 1, 2)))
