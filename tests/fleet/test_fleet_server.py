"""`python -m runtime.policy_server --workers 2` as deployed: a front host (broker) and two worker
processes on 127.0.0.1, the fixed backend (no model), robots through the one endpoint.

Runs end by counting (chunks, refreshes, replies); `CAP_S` and the deadlines of `eventually` only turn
a hang into a failure. Which worker holds a robot is read from the replies' `epoch` (each worker's
own) and from the broker's `ping`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from robots.sim import SimArm
from runtime.robot.chunk_buffer import BufferSettings
from runtime.robot.control_loop import ControlLoop, LoopSettings
from tests.support.eventually import eventually
from tests.support.server_process import ServerProcess
from transport.errors import RemoteError
from transport.ws_client import JsonApiClient
from transport.zmq_client import PolicyClient

HEARTBEAT_S = 0.2
CAP_S = 60.0  # failure detection only
IMAGES = {"base_0_rgb": np.zeros((8, 8, 3), np.uint8)}


@pytest.fixture
def fleet():
    server = ServerProcess("--workers", "2", "--fixed-reply", "--heartbeat", str(HEARTBEAT_S), gateways=False)
    server.start(CAP_S)
    yield server
    server.stop()


def _workers(server: ServerProcess) -> dict[str, int]:
    """Worker name -> pid, from the front host's children."""
    out = {}
    for pid in server.children():
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--worker-name" in argv:
            out[argv[argv.index(b"--worker-name") + 1].decode()] = pid
    return out


def _placement(client: PolicyClient) -> dict[str, int]:
    return {w["name"]: w["robots"] for w in client.ping()["broker"]["workers"]}


def test_several_robots_share_one_endpoint_and_each_sticks_to_its_worker(fleet):
    clients = [PolicyClient(fleet.router, f"arm{i}", timeout_s=10) for i in range(6)]
    try:
        epochs = {c.robot_id: {c.infer(IMAGES, "go")["epoch"] for _ in range(4)} for c in clients}
        assert all(len(seen) == 1 for seen in epochs.values()), epochs  # one worker per robot, all along
        assert len({e for seen in epochs.values() for e in seen}) == 2  # both workers serve
        assert _placement(clients[0]) == {"cpu0": 3, "cpu1": 3}
        pong = clients[0].ping()
        assert pong["server"]["healthy"] and pong["model"]["backend"] == "fixed reply (no model)"
        for c in clients:
            assert c.bye()["dropped"]
    finally:
        for c in clients:
            c.close()


def test_websocket_clients_reach_the_workers_through_the_front_hosts_gateways():
    """The gateways stay on the front host and talk to the broker's internal endpoints; each
    WebSocket connection is a robot the broker places like any other."""

    async def scenario(url: str) -> list[dict]:
        async with JsonApiClient(url) as a, JsonApiClient(url) as b:
            return list(
                await asyncio.gather(
                    a.infer({"base_0_rgb": IMAGES["base_0_rgb"]}, "task a", subtask_refresh_interval=0.5),
                    b.infer({"base_0_rgb": IMAGES["base_0_rgb"]}, "task b"),
                )
            )

    server = ServerProcess("--workers", "2", "--fixed-reply", "--heartbeat", str(HEARTBEAT_S)).start(CAP_S)
    try:
        replies = asyncio.run(scenario(server.ws))
        assert [r["actions"].shape for r in replies] == [(1, 50, 32)] * 2
        assert replies[0]["subtask_refresh_interval"] == 0.5
        with PolicyClient(server.router, "probe", timeout_s=10) as probe:
            assert probe.ping()["broker"]["forwarded"] >= 2
    finally:
        server.stop()


def test_refreshes_from_both_workers_reach_their_subscribers_and_gone_robots_expire(fleet):
    received: dict[str, int] = {}
    clients = [PolicyClient(fleet.router, f"arm{i}", timeout_s=10) for i in range(4)]
    try:
        for c in clients:
            c.listen_refreshes(fleet.pub, lambda m: received.__setitem__(m["robot"], received.get(m["robot"], 0) + 1))
            c.set_refresh(0.2, IMAGES, "tidy up")
        assert _placement(clients[0]) == {"cpu0": 2, "cpu1": 2}

        def all_refreshed() -> bool:
            for c in clients:
                c.poll(0.01)
            return all(received.get(c.robot_id, 0) >= 3 for c in clients)

        assert eventually(all_refreshed), received
        assert clients[0].ping()["server"]["refreshing"] == 4
    finally:
        for c in clients[1:]:
            c.close()  # gone without a word: their SUBs disconnect, so the workers see no subscriber
    try:
        # Each worker counts its topics' subscribers through the broker: the gone robots' sessions end
        # (3 intervals, at least 2 s, of silence without a subscriber); the one still listening stays.
        assert eventually(lambda: clients[0].ping()["server"]["refreshing"] == 1)
        count = received[clients[0].robot_id]
        assert eventually(lambda: (clients[0].poll(0.01), received[clients[0].robot_id] > count + 2)[1])
    finally:
        clients[0].close()


def test_a_refresh_set_once_resumes_on_the_new_worker_after_a_move(fleet):
    """Robots that set their refresh once (as a WebSocket client may) and then only ask for chunks: the
    broker hands the interval to a moved robot's new worker with its first request there."""
    received: dict[str, int] = {}
    clients = [PolicyClient(fleet.router, f"arm{i}", timeout_s=10) for i in range(4)]

    def count(message: dict) -> None:
        received[message["robot"]] = received.get(message["robot"], 0) + 1

    def served_and_refreshed(at_least: dict[str, int]) -> bool:
        for c in clients:
            try:
                c.infer(IMAGES, "tidy up")
            except RemoteError as e:
                assert e.code == "unavailable"
            c.poll(0.02)
        return all(received.get(c.robot_id, 0) >= at_least[c.robot_id] for c in clients)

    try:
        for c in clients:
            c.listen_refreshes(fleet.pub, count)
            c.set_refresh(0.2, IMAGES, "tidy up")
        assert eventually(lambda: served_and_refreshed({c.robot_id: 2 for c in clients}))
        os.kill(_workers(fleet)["cpu0"], signal.SIGKILL)
        goal = {c.robot_id: received[c.robot_id] + 4 for c in clients}
        assert eventually(lambda: served_and_refreshed(goal)), (received, goal)
        assert clients[0].ping()["broker"]["robots_moved"] == 2
    finally:
        for c in clients:
            c.close()


def _loops_through(fleet: ServerProcess, fault: Callable[[int], None], robots: int = 4) -> dict[int, dict]:
    """`robots` control loops at 50 Hz, each asking for a chunk every 5 ticks (so requests are in
    flight whenever the fault strikes), through `fault(pid of worker cpu0)`; their summaries once
    every robot got 10 more chunks after it."""
    pid = _workers(fleet)["cpu0"]
    settings = LoopSettings(
        hz=50.0, buffer=BufferSettings(request_when_left=45, blend="replace"), request_timeout_s=5.0
    )
    loops, threads, summaries = [], [], {}
    for i in range(robots):
        client = PolicyClient(fleet.router, f"arm{i}", timeout_s=10)
        loop = ControlLoop(SimArm(control_hz=50.0, image_size=32), client, settings)
        thread = threading.Thread(target=lambda i=i, loop=loop: summaries.__setitem__(i, loop.run(CAP_S)), daemon=True)
        loops.append((loop, client))
        threads.append(thread)
        thread.start()
    try:
        assert eventually(lambda: all(loop.buffer.metrics.chunks_received >= 3 for loop, _ in loops))
        before = [loop.buffer.metrics.chunks_received for loop, _ in loops]
        fault(pid)
        assert eventually(
            lambda: all(lp.buffer.metrics.chunks_received >= b + 10 for (lp, _), b in zip(loops, before, strict=True))
        )
    finally:
        for loop, _ in loops:
            loop.stop()
        for thread in threads:
            thread.join(CAP_S)
        for _, client in loops:
            client.close()
    assert not any(t.is_alive() for t in threads)  # nothing hangs
    return summaries


def _moved(summaries: dict[int, dict]) -> list[int]:
    """The robots of the failed worker: they saw a second epoch (the live worker's)."""
    moved = [i for i, s in summaries.items() if s["server_restarts"]]
    assert len(moved) == len(summaries) // 2, summaries
    for i, s in summaries.items():
        if i not in moved:  # the other worker's robots never noticed
            assert s["request_errors"] == 0 and s["outages"] == 0 and s["server_restarts"] == 0, s
    return moved


def test_killing_a_worker_mid_run_leaves_every_robot_served(fleet):
    summaries = _loops_through(fleet, lambda pid: os.kill(pid, signal.SIGKILL))
    # Its robots moved (a second epoch). Whether one counts an outage depends on whether it had a
    # request on the dead worker: the fixed backend answers at once, so usually none is lost.
    _moved(summaries)
    # The front host starts the dead worker again; it joins and is placed new robots.
    assert "policy worker cpu0 exited with -9" in fleet.log
    with PolicyClient(fleet.router, "late", timeout_s=10) as probe:
        assert eventually(lambda: len(probe.ping()["broker"]["workers"]) == 2)
        assert probe.ping()["broker"]["robots_moved"] == 2


def test_a_hung_worker_is_noticed_by_its_missing_heartbeats_and_its_requests_answered(fleet):
    stopped: list[int] = []

    def hang(pid: int) -> None:
        os.kill(pid, signal.SIGSTOP)  # alive, connected, silent: only the heartbeats tell
        stopped.append(pid)

    try:
        summaries = _loops_through(fleet, hang)
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
    for i in _moved(summaries):
        # The requests it held were answered `unavailable`: the loop counts the outage (it held the
        # safe action until the live worker answered), not a failed request.
        assert summaries[i]["outages"] >= 1 and summaries[i]["request_errors"] == 0, summaries[i]
    assert "worker 'cpu0' presumed dead" in fleet.log
    # Woken up, it hears that the broker dropped it, drops its sessions and joins again.
    with PolicyClient(fleet.router, "late", timeout_s=10) as probe:
        assert eventually(lambda: len(probe.ping()["broker"]["workers"]) == 2)
    assert eventually(lambda: "joining again" in fleet.log)


def test_a_worker_that_cannot_start_is_a_start_up_error_not_a_restart_loop():
    # The front host loads no model: the checkpoint that does not exist fails in each worker.
    server = ServerProcess("--workers", "2", "--checkpoint", "/does/not/exist", gateways=False).spawn()
    assert server.proc is not None
    try:
        server.proc.wait(CAP_S)
    finally:
        code = server.stop()  # (reads the log to its end)
    assert code == 2 and "exited before it joined" in server.log


def test_a_front_host_is_ready_only_once_its_workers_compiled_every_batch_bucket():
    """Robots started right after a fleet's `ready` used to meet workers still compiling (hundreds of
    underruns): a worker joins its broker, and so the front host announces itself, only once warm."""
    with ServerProcess("--workers", "1", "--max-batch", "2", gateways=False) as fleet:
        assert fleet.ready is not None and fleet.ready["role"] == "front host"
        lines = fleet.log.splitlines()
    joined = next(i for i, line in enumerate(lines) if "joined" in line and "cpu0" in line)
    compiled = [i for i, line in enumerate(lines) if "compiled" in line and "for batch 2" in line]
    assert compiled and max(compiled) < joined, "\n".join(lines)
