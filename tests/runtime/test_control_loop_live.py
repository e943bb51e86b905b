"""The control loop against the real server (tiny model, real ZMQ on 127.0.0.1), end to end.

Runs end by counting (chunks, refreshes, outages), never after a fixed time; `CAP_S` only keeps a
broken server from hanging the suite. Timeouts come from latency measured in the same test.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time

import numpy as np

from robots.sim import SimArm
from runtime.robot.chunk_buffer import BufferSettings
from runtime.robot.control_loop import ControlLoop, LoopSettings, LoopStatus
from tests.support.ports import free_local_ports
from tests.support.server_thread import ServerThread
from transport.zmq_client import PolicyClient

HZ = 50.0
CAP_S = 180.0  # a failsafe, not a budget
SAFE = (9.0, 9.0, 9.0, 9.0)  # nothing the model would plan: tells the held safe action apart
IMAGES = {"base_0_rgb": np.zeros((224, 224, 3), np.uint8)}


def _server(engine, router: int, pub: int) -> ServerThread:
    argv = ["--router-port", str(router), "--pub-port", str(pub), "--ws-port", "0", "--openpi-port", "0"]
    return ServerThread(argv, backend=engine)


def _measured_latency_s(endpoint: str, n: int = 3) -> float:
    """The slowest of `n` chunk requests, as this machine serves them now."""
    with PolicyClient(endpoint, "probe", timeout_s=60) as client:
        samples = []
        for _ in range(n):
            start = time.monotonic()
            client.infer(IMAGES, "probe", generate_subtask=False, max_decoding_steps=4)
            samples.append(time.monotonic() - start)
        client.bye()
    return max(samples)


def _settings(latency_s: float, **overrides) -> LoopSettings:
    # Ask for the next chunk early enough for three times the latency measured (at most 45 of 50).
    left = min(45, math.ceil(3 * latency_s * HZ) + 2)
    buffer = BufferSettings(request_when_left=left, blend="replace", safe_action=SAFE)
    base = {"hz": HZ, "buffer": buffer, "max_decoding_steps": 4, "request_timeout_s": max(2.0, 10 * latency_s)}
    return LoopSettings(**{**base, **overrides})


def _run_in_thread(loop: ControlLoop) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run() -> None:
        try:
            out["summary"] = loop.run(CAP_S)
        except BaseException as e:  # re-raised by the test
            out["error"] = e

    thread = threading.Thread(target=run, name="test-robot", daemon=True)
    thread.start()
    return thread, out


def _finish(thread: threading.Thread, out: dict) -> dict:
    thread.join(CAP_S + 30)
    if "error" in out:
        raise out["error"]
    return out["summary"]


def test_chunks_from_the_real_server_run_at_the_steps_they_were_computed_for(engine):
    router, pub = free_local_ports(2)
    with _server(engine, router, pub) as server:
        latency = _measured_latency_s(server.endpoints["router"])
        with PolicyClient(server.endpoints["router"], "arm", timeout_s=60) as client:
            loop = ControlLoop(SimArm(control_hz=HZ), client, _settings(latency))
            merged: list[tuple[np.ndarray, int, int]] = []
            add = loop.buffer.add_chunk

            def recording_add(actions, obs_step, now_step, *args, **kwargs):
                merged.append((np.array(actions), obs_step, now_step))
                return add(actions, obs_step, now_step, *args, **kwargs)

            loop.buffer.add_chunk = recording_add
            loop._on_tick = lambda st: loop.stop() if len(merged) >= 4 else None
            summary = loop.run(CAP_S)
    executed = np.array(loop.executed)
    assert summary["chunks_received"] == len(merged) >= 4 and summary["outages"] == 0
    # With `replace`, each chunk's actions run from its arrival on, shifted by exactly the steps
    # that passed while it was computed, until the next chunk or its end; past it, the safe action.
    for (actions, obs_step, now_step), (_, _, next_step) in zip(
        merged, [*merged[1:], (None, 0, len(executed))], strict=True
    ):
        delay = now_step - obs_step
        span = min(next_step, len(executed)) - now_step
        planned = min(span, len(actions) - delay)
        np.testing.assert_array_equal(executed[now_step : now_step + planned], actions[delay : delay + planned, :4])
        assert (executed[now_step + planned : now_step + span] == SAFE).all()
    assert summary["underruns"] == int((executed == SAFE).all(axis=1).sum())


def test_the_loop_rides_through_a_server_restart_on_the_same_ports(engine):
    router, pub = free_local_ports(2)
    first = _server(engine, router, pub)
    latency = _measured_latency_s(first.endpoints["router"])
    outage = threading.Event()
    ticks: list[tuple[LoopStatus, np.ndarray]] = []
    chunks_at_restart: list[int] = []

    def on_tick(st: LoopStatus) -> None:
        ticks.append((dataclasses.replace(st), loop.executed[-1]))
        if st.in_outage:
            outage.set()
        served_again = chunks_at_restart and st.outages == 1 and not st.in_outage
        if served_again and st.server_restarts >= 1 and tuple(loop.executed[-1]) != SAFE:
            loop.stop()  # a chunk of the restarted server is being executed

    client = PolicyClient(f"127.0.0.1:{router}", "phoenix", timeout_s=60, connect_timeout_s=1.0)
    # One chunk request at a time leaves the model room for the refreshes (they yield to actions).
    settings = _settings(latency, subtask_mode="refresh", refresh_interval_s=max(0.3, 3 * latency), max_in_flight=1)
    loop = ControlLoop(SimArm(control_hz=HZ), client, settings, f"127.0.0.1:{pub}", on_tick)
    thread, out = _run_in_thread(loop)
    second = None
    try:
        deadline = time.monotonic() + CAP_S
        # Running, and the first server's epoch known (from a refresh), before it goes away.
        while not (loop.buffer.metrics.chunks_received >= 2 and loop.status.refresh_count >= 1):
            assert thread.is_alive() and time.monotonic() < deadline, "the loop never got going"
            time.sleep(0.05)
        first.stop()  # the server goes away: its sockets close
        assert outage.wait(CAP_S), "the loop never noticed the server was gone"
        chunks_at_restart.append(loop.buffer.metrics.chunks_received)
        second = _server(engine, router, pub)
        summary = _finish(thread, out)
        with PolicyClient(second.endpoints["router"], "probe") as probe:
            after = probe.ping()["server"]
    finally:
        loop.stop()
        thread.join(30)
        client.close()
        if second is not None:
            second.stop()
    assert summary["outages"] == 1 and summary["server_restarts"] == 1 and summary["outage_s"] > 0
    in_outage = [(st, action) for st, action in ticks if st.in_outage]
    held = [tuple(action) == SAFE for _, action in in_outage]
    assert any(held), "the safe action was never held during the outage"
    assert held == sorted(held)  # once the plan ran out, the safe action until service came back
    recovered = [action for st, action in ticks if st.outages == 1 and not st.in_outage]
    assert recovered and tuple(recovered[-1]) != SAFE  # the next chunk came after the restart
    assert summary["chunks_received"] > chunks_at_restart[0]
    assert after["refreshing"] == 0 and after["sessions"] == 0  # it signed off from the new server


def test_after_the_loop_stops_the_server_no_longer_refreshes_it(engine):
    router, pub = free_local_ports(2)
    with _server(engine, router, pub) as server:
        latency = _measured_latency_s(server.endpoints["router"])
        settings = _settings(latency, subtask_mode="refresh", refresh_interval_s=max(0.2, 3 * latency), max_in_flight=1)
        with PolicyClient(server.endpoints["router"], "leaver", timeout_s=60) as client:
            loop = ControlLoop(SimArm(control_hz=HZ), client, settings, server.endpoints["pub"])
            loop._on_tick = lambda st: loop.stop() if st.refresh_count >= 2 else None
            thread, out = _run_in_thread(loop)
            with PolicyClient(server.endpoints["router"], "probe") as probe:
                deadline = time.monotonic() + CAP_S
                while loop.status.refresh_count < 1 and thread.is_alive() and time.monotonic() < deadline:
                    time.sleep(0.05)
                during = probe.ping()["server"]
                summary = _finish(thread, out)
                after = probe.ping()["server"]
    assert summary["refresh_count"] >= 2 and summary["subtasks_seen"] >= 2
    assert during["refreshing"] == 1
    assert after["refreshing"] == 0 and after["sessions"] == 0
