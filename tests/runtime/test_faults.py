"""Faults around a live policy server: clients that vanish, stall or misbehave, a failing backend,
limits, a restart on the same ports, and starting and stopping like a service (issue 9).

Most tests run the server on a thread of this process (`ServerThread`) with a backend that needs
no model (`FixedBackend`, or a subclass that holds, fails or records requests), so each fault is
injected exactly; the start/stop tests and the restart run `python -m runtime.policy_server` as a
process. Times are never budgets of their own: a bound comes from a baseline measured in the same
test (a start, a latency, a rate) or is a generous deadline for something that must happen.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import statistics
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from typing import Any

import msgpack
import numpy as np
import pytest
import websockets.sync.client as ws_client
import zmq

from policy.request import InferenceRequest, InferenceResult
from runtime.policy_server.fixed_backend import FixedBackend
from runtime.policy_server.service import ServiceLimits
from tests.support.eventually import eventually
from tests.support.ports import free_local_ports
from tests.support.processes import wait_pids_gone
from tests.support.raw_dealer import (
    RawDealer,
    image,
    infer_arrays,
    infer_header,
    ping,
)
from tests.support.server_process import REPO, ServerProcess
from tests.support.serving import zmq_server_thread as server_thread
from transport import codec
from transport.zmq_client import PolicyClient


def _error_code(reply: dict[str, Any]) -> str | None:
    return reply["error"]["code"] if reply.get("type") == "error" else None


def _refresh_header(request_id: int, robot: str, interval: Any, **options: Any) -> dict[str, Any]:
    return {
        "type": "refresh",
        "id": request_id,
        "robot": robot,
        "options": {"subtask_refresh_interval": interval, "high_level_prompt": "tidy up", **options},
    }


OBS = {"image/base_0_rgb": image(8, 8)}


# ============================================================================ backends


class GatedBackend(FixedBackend):
    """Holds every infer until `gate` is set; `entered` counts the requests that reached it."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.entered = threading.Semaphore(0)

    async def submit(self, request: InferenceRequest) -> InferenceResult:
        if request.kind == "infer":
            self.entered.release()
            while not self.gate.is_set():
                await asyncio.sleep(0.002)
        return await super().submit(request)


class FailingBackend(FixedBackend):
    """Raises inside the step named `where` for requests whose prompt is "fail"."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where

    def check(self, request: InferenceRequest) -> None:
        if self.where == "check" and request.prompt == "fail":
            raise KeyError("injected failure in check")
        super().check(request)

    async def prepare_images(self, images):
        if self.where == "prepare_images" and images.get("base_0_rgb", np.zeros(1))[0, 0, 0] == 13:
            raise RuntimeError("injected failure in prepare_images")
        return await super().prepare_images(images)

    async def submit(self, request: InferenceRequest) -> InferenceResult:
        if self.where == "submit" and request.prompt == "fail":
            await asyncio.sleep(0.01)  # fails while others are in flight
            raise RuntimeError("injected failure in submit")
        return await super().submit(request)


@dataclasses.dataclass(frozen=True)
class Seen:
    kind: str
    priority: str
    cameras: tuple[str, ...]
    prompt: str
    max_decoding_steps: int


class RecordingBackend(FixedBackend):
    """Checks every request it runs, as the engine does (refreshes included), and records it.

    Its limit on `max_decoding_steps` stands for the engine's own, which the transports do not know.
    """

    MAX_DECODING_STEPS = 48

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Seen] = []

    def check(self, request: InferenceRequest) -> None:
        if request.options.max_decoding_steps > self.MAX_DECODING_STEPS:
            raise ValueError(f"max_decoding_steps must be at most {self.MAX_DECODING_STEPS}")
        super().check(request)

    async def submit(self, request: InferenceRequest) -> InferenceResult:
        self.check(request)
        self.seen.append(
            Seen(
                request.kind,
                request.priority,
                tuple(sorted(request.observation.images)),
                request.prompt,
                request.options.max_decoding_steps,
            )
        )
        return await super().submit(request)


class BigRefreshBackend(FixedBackend):
    """Refreshes carry a large subtask, so a subscriber that does not read fills its queues fast."""

    SUBTASK = "s" * 32 * 1024

    async def submit(self, request: InferenceRequest) -> InferenceResult:
        result = await super().submit(request)
        return dataclasses.replace(result, subtask=self.SUBTASK) if request.priority == "refresh" else result


# ============================================================================ clients that vanish


def test_a_client_that_leaves_before_its_reply_is_dropped_quietly_and_others_are_served(caplog):
    caplog.set_level(logging.INFO)
    backend = GatedBackend()
    with server_thread(backend) as server:
        router = server.endpoints["router"]
        leavers = [RawDealer(router) for _ in range(3)]
        for i, dealer in enumerate(leavers):
            dealer.send(codec.encode(infer_header(i, robot=f"leaver-{i}"), infer_arrays(i)))
        for _ in leavers:
            assert backend.entered.acquire(timeout=10), "the requests never reached the backend"
        for dealer in leavers:
            dealer.close()
        with RawDealer(router) as stayer:
            stayer.send(codec.encode(infer_header(7, robot="stayer"), infer_arrays()))
            assert backend.entered.acquire(timeout=10)
            time.sleep(0.2)  # lets ZeroMQ tear down the leavers' pipes (either way the reply must go quietly)
            backend.gate.set()
            frames = stayer.receive(10)
        assert frames is not None, "the client that stayed got no reply"
        reply, arrays = codec.decode(frames)
        assert reply["type"] == "result" and reply["id"] == 7 and arrays["actions"].shape == (50, 32)
        assert eventually(lambda: backend.served == 4, 10)
        with PolicyClient(router, "after", timeout_s=10, retries=0) as client:
            assert client.infer({"base_0_rgb": image()}, "go")["actions"].shape == (50, 32)
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith(("transport", "runtime"))]
    assert not loud, [r.getMessage() for r in loud]


# ============================================================================ a subscriber that never reads


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


class _Reader(threading.Thread):
    """A SUB that reads every refresh of `robots` and counts them, with their seq numbers.

    It subscribes to each robot's exact topic, as each robot's own listener does: that is what
    keeps a robot that sends no requests from expiring as gone."""

    def __init__(self, endpoint: str, robots: list[str]):
        super().__init__(daemon=True)
        self.sub = zmq.Context.instance().socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        for robot in robots:
            self.sub.setsockopt(zmq.SUBSCRIBE, robot.encode())
        self.sub.connect(endpoint)
        self.seqs: list[int] = []
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            if self.sub.poll(50):
                while True:
                    try:
                        frames = self.sub.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self.seqs.append(msgpack.unpackb(frames[1])["seq"])

    def stop(self) -> None:
        self._done.set()
        self.join(5)
        self.sub.close(linger=0)


def _infer_latencies(router: str, n: int) -> list[float]:
    out = []
    with PolicyClient(router, "measured", timeout_s=10, retries=0) as client:
        client.infer({"base_0_rgb": image()}, "go")  # connected and warm
        for _ in range(n):
            start = time.perf_counter()
            client.infer({"base_0_rgb": image()}, "go")
            out.append(time.perf_counter() - start)
    return out


def test_a_subscriber_that_never_reads_slows_neither_publishing_nor_requests():
    robots, interval, n = 6, 0.01, 150
    with server_thread(BigRefreshBackend(), "--min-refresh-interval", str(interval)) as server:
        router, pub = server.endpoints["router"], server.endpoints["pub"]
        reader = _Reader(pub, [f"r{i}" for i in range(robots)])
        reader.start()
        with RawDealer(router) as dealer:
            for i in range(robots):
                assert dealer.request(_refresh_header(i, f"r{i}", interval), OBS)["type"] == "refresh_ack"
        assert eventually(lambda: len(reader.seqs) > 50, 10), "no refreshes arrived"

        # Baseline: the same refresh load, every subscriber reading.
        before, start = len(reader.seqs), time.monotonic()
        baseline = _infer_latencies(router, n)
        baseline_rate = (len(reader.seqs) - before) / (time.monotonic() - start)

        # A subscriber that never reads, with the smallest queues ZeroMQ and the kernel allow.
        stalled = zmq.Context.instance().socket(zmq.SUB)
        stalled.setsockopt(zmq.LINGER, 0)
        stalled.setsockopt(zmq.RCVHWM, 1)
        stalled.setsockopt(zmq.RCVBUF, 4096)
        stalled.setsockopt(zmq.SUBSCRIBE, b"")
        stalled.connect(pub)
        try:
            # Past the server's send high-water mark (1000) and both kernel buffers: it now drops.
            joined = len(reader.seqs)
            assert eventually(lambda: len(reader.seqs) - joined > 2500, 30), "refreshes stopped arriving"
            before, start = len(reader.seqs), time.monotonic()
            with_stalled = _infer_latencies(router, n)
            stalled_rate = (len(reader.seqs) - before) / (time.monotonic() - start)
            with RawDealer(router) as dealer:
                for i in range(robots):
                    assert dealer.request(_refresh_header(i, f"r{i}", None))["type"] == "refresh_ack"
            last_published = max(reader.seqs)
            kept = []
            while stalled.poll(500):
                kept.append(msgpack.unpackb(stalled.recv_multipart()[1])["seq"])
        finally:
            stalled.close(linger=0)
            reader.stop()
    # The silent subscriber really was stalled: it lost messages rather than holding up the rest.
    published = last_published - kept[0] + 1
    assert len(kept) < 0.8 * published, f"the silent subscriber kept {len(kept)} of {published}: never stalled"
    assert stalled_rate >= 0.5 * baseline_rate, f"publishing slowed from {baseline_rate:.0f}/s to {stalled_rate:.0f}/s"
    p50, p50_stalled = statistics.median(baseline), statistics.median(with_stalled)
    p90, p90_stalled = _percentile(baseline, 90), _percentile(with_stalled, 90)
    print(f"infer p50 {p50 * 1e3:.2f} -> {p50_stalled * 1e3:.2f} ms, p90 {p90 * 1e3:.2f} -> {p90_stalled * 1e3:.2f} ms")
    print(f"refreshes {baseline_rate:.0f}/s -> {stalled_rate:.0f}/s; the stalled SUB kept {len(kept)} of {published}")
    assert p50_stalled <= 5 * p50, "a subscriber that never reads slowed other robots"


# ============================================================================ a failing backend


@pytest.mark.parametrize("where", ["submit", "prepare_images", "check"])
def test_a_backend_failure_answers_internal_to_its_callers_and_the_next_request_works(where, caplog):
    caplog.set_level(logging.INFO)
    with server_thread(FailingBackend(where)) as server:
        router = server.endpoints["router"]
        failing_arrays = {"image/base_0_rgb": np.full((8, 8, 3), 13, np.uint8)}
        dealers = [RawDealer(router) for _ in range(6)]
        try:
            for i, dealer in enumerate(dealers):  # all in flight at once: three fail, three do not
                fail = i % 2 == 0
                header = infer_header(i, robot=f"r{i}", high_level_prompt="fail" if fail else "go")
                dealer.send(codec.encode(header, failing_arrays if fail else infer_arrays(i)))
            replies = [dealer.receive(10) for dealer in dealers]
        finally:
            for dealer in dealers:
                dealer.close()
        for i, frames in enumerate(replies):
            assert frames is not None, f"request {i} got no reply"
            reply, arrays = codec.decode(frames)
            assert reply["id"] == i
            if i % 2 == 0:
                assert _error_code(reply) == "internal", reply
            else:
                assert reply["type"] == "result" and arrays["actions"].shape == (50, 32), reply
        with PolicyClient(router, "r0", timeout_s=10, retries=0) as client:  # a robot whose request failed
            assert client.infer({"base_0_rgb": image()}, "go")["actions"].shape == (50, 32)
        assert ping(router)["healthy"] is True
    logged = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert 1 <= len(logged) <= 3, [r.getMessage() for r in logged]  # each failure logged once, with its traceback


class FlakyRefreshBackend(FixedBackend):
    """The first `failures` refresh generations raise."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def submit(self, request: InferenceRequest) -> InferenceResult:
        if request.priority == "refresh" and self.failures > 0:
            self.failures -= 1
            raise RuntimeError("injected refresh failure")
        return await super().submit(request)


def test_refreshes_go_on_after_a_generation_fails():
    backend = FlakyRefreshBackend(failures=3)
    with server_thread(backend, "--min-refresh-interval", "0.05") as server:
        got: list[dict[str, Any]] = []
        with PolicyClient(server.endpoints["router"], "arm", timeout_s=10, retries=0) as client:
            client.listen_refreshes(server.endpoints["pub"], got.append)
            client.set_refresh(0.05, {"base_0_rgb": image()}, "tidy up")

            def refreshed() -> bool:
                client.poll(0.05)
                return len(got) >= 2

            assert eventually(refreshed, 10), "the refresh stopped after its generations failed"
    assert backend.failures == 0 and [m["refresh_count"] for m in got[:2]] == [1, 2]


# ============================================================================ validate, then commit


def test_a_refresh_interval_below_the_minimum_is_refused_and_changes_nothing():
    with server_thread(FixedBackend(), "--min-refresh-interval", "0.5") as server:
        router = server.endpoints["router"]
        with RawDealer(router) as dealer:
            for kind in ("refresh", "infer"):
                header = {**_refresh_header(1, "arm", 0.1), "type": kind}
                reply = dealer.request(header, OBS)
                assert _error_code(reply) == "bad_request", reply
                assert "subtask_refresh_interval" in reply["error"]["message"], reply
            state = ping(router)
            assert (state["refreshing"], state["sessions"]) == (0, 0), state
            # The minimum itself is accepted: the check above could see a change.
            assert dealer.request(_refresh_header(2, "arm", 0.5), OBS)["data"]["subtask_refresh_enabled"] is True
            assert ping(router)["refreshing"] == 1


def test_a_rejected_request_leaves_the_session_unchanged():
    backend = RecordingBackend()
    with server_thread(backend, "--min-refresh-interval", "0.05") as server:
        router = server.endpoints["router"]
        with RawDealer(router) as dealer:
            ack = dealer.request(_refresh_header(1, "arm", 0.1, high_level_prompt="prompt A"), OBS)
            assert ack["data"]["subtask_refresh_enabled"] is True, ack

            def refreshes() -> list[Seen]:
                return [s for s in backend.seen if s.priority == "refresh"]

            assert eventually(lambda: len(refreshes()) >= 1, 10)
            rejected = [
                # An unknown camera, with a new prompt and a faster refresh.
                (_refresh_header(2, "arm", 0.05, high_level_prompt="prompt B") | {"type": "infer"},
                 {"image/bogus_cam": image(8, 8)}),
                # Decoding steps past the engine's limit, with a new prompt and another interval.
                (_refresh_header(3, "arm", 1.0, high_level_prompt="prompt C", max_decoding_steps=50), OBS),
                # An image larger than the backend takes, with a new prompt; the refresh cleared.
                (_refresh_header(4, "arm", None, high_level_prompt="prompt D"), {"image/base_0_rgb": image(1100, 2)}),
            ]  # fmt: skip
            for header, arrays in rejected:
                reply = dealer.request(header, arrays)
                assert _error_code(reply) == "bad_request", reply
                # Each rejection on its own: the refreshes that follow still run as before it.
                after = len(refreshes())
                assert eventually(lambda n=after: len(refreshes()) >= n + 2, 10), f"no refresh after {header}"
                for seen in refreshes()[after:]:
                    assert seen == Seen("subtask", "refresh", ("base_0_rgb",), "prompt A", 25), (header, seen)
            ack = dealer.request({"type": "refresh", "id": 5, "robot": "arm"})
        assert ack["data"]["subtask_refresh_interval"] == 0.1, ack
        assert ping(router)["refreshing"] == 1


def test_a_rejected_first_request_creates_no_session():
    with server_thread(FixedBackend(), "--min-refresh-interval", "0.05") as server:
        router = server.endpoints["router"]
        with RawDealer(router) as dealer:
            reply = dealer.request(_refresh_header(1, "new", 0.1), {"image/bogus_cam": image(8, 8)})
            assert _error_code(reply) == "bad_request", reply
        state = ping(router)
        assert (state["sessions"], state["refreshing"]) == (0, 0), state


# ============================================================================ robots that leave without bye

ROBOT_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    from transport.zmq_client import PolicyClient

    router, pub, interval = sys.argv[1], sys.argv[2], float(sys.argv[3])
    got = []
    client = PolicyClient(router, "gone-robot", timeout_s=10, retries=0)
    client.listen_refreshes(pub, got.append)
    client.set_refresh(interval, {"base_0_rgb": np.zeros((8, 8, 3), np.uint8)}, "tidy up")
    while not got:
        client.poll(0.1)
    print("refreshing", flush=True)
    while True:  # reads its refreshes, sends nothing: alive and quiet
        client.poll(1.0)
    """
)


@pytest.mark.parametrize("how", ["sockets closed", "process killed", "sockets closed, a monitor subscribed to all"])
def test_a_robot_that_leaves_without_bye_is_no_longer_refreshed(how):
    """`ping` stops counting it within a few intervals; a robot that is alive, subscribed and quiet
    keeps its refresh. A monitor (a dashboard, a logger) subscribed to every topic is no robot."""
    interval = 0.1
    with server_thread(FixedBackend(), "--min-refresh-interval", str(interval)) as server:
        router, pub = server.endpoints["router"], server.endpoints["pub"]
        robot: subprocess.Popen | None = None
        client: PolicyClient | None = None
        monitor = zmq.Context.instance().socket(zmq.SUB)
        monitor.setsockopt(zmq.LINGER, 0)
        if "monitor" in how:
            monitor.setsockopt(zmq.SUBSCRIBE, b"")
            monitor.connect(pub)
        try:
            if how == "process killed":
                robot = subprocess.Popen(
                    [sys.executable, "-c", ROBOT_SCRIPT, router, pub, str(interval)],
                    stdout=subprocess.PIPE, text=True, cwd=REPO,
                )  # fmt: skip
                assert robot.stdout is not None and robot.stdout.readline().strip() == "refreshing"
            else:
                got: list[dict[str, Any]] = []
                client = PolicyClient(router, "gone-robot", timeout_s=10, retries=0)
                client.listen_refreshes(pub, got.append)
                client.set_refresh(interval, {"base_0_rgb": image()}, "tidy up")
                assert eventually(lambda: client.poll(0.05) or bool(got), 10)
            assert ping(router)["refreshing"] == 1
            # Alive, subscribed and quiet for longer than a gone robot is given: still refreshing.
            limits = ServiceLimits()  # the server's defaults: how long a gone robot is given
            quiet_s = max(limits.expiry_intervals * interval, limits.min_expiry_s) + 1.0
            time.sleep(quiet_s)
            assert ping(router)["refreshing"] == 1, "a robot that is still subscribed lost its refresh"
            left = time.monotonic()
            if robot is not None:
                robot.kill()
                robot.wait()
            else:
                assert client is not None
                client.close()
            assert eventually(lambda: ping(router)["refreshing"] == 0, 2 * quiet_s), (
                f"the robot is still refreshing {time.monotonic() - left:.1f} s after it left"
            )
            print(f"expired {time.monotonic() - left:.1f} s after the robot left ({how})")
            assert ping(router)["sessions"] == 0
        finally:
            monitor.close(linger=0)
            if robot is not None and robot.poll() is None:
                robot.kill()
                robot.wait()


# ============================================================================ limits


def test_a_client_address_holds_at_most_its_share_of_sessions_whatever_its_identities():
    """The cap counts a client's address (its key under CURVE), not its DEALER identities, which it
    chooses freely; past it the address's least recently seen session ends, so new robots are served."""
    with server_thread(FixedBackend(), "--max-sessions-per-peer", "3") as server:
        router = server.endpoints["router"]
        other_host = "tcp://127.0.0.2:0;" + router.removeprefix("tcp://")  # the source address: another host
        with RawDealer(router) as greedy, RawDealer(router) as twin, RawDealer(other_host) as other:
            for i in range(3):
                assert greedy.request(_refresh_header(i, f"g{i}", 1.0))["type"] == "refresh_ack"
            assert other.request(_refresh_header(3, "o0", 1.0))["type"] == "refresh_ack"
            # A new identity from the same address is the same client: its robot takes g0's place.
            assert twin.request(_refresh_header(4, "g3", None))["type"] == "refresh_ack"
            assert ping(router)["sessions"] == 4
            assert greedy.request({"type": "bye", "id": 5, "robot": "g0"})["data"]["dropped"] is False
            assert greedy.request({"type": "bye", "id": 6, "robot": "o0"})["data"]["dropped"] is True


@pytest.mark.parametrize("kind", ["infer", "subtask", "refresh", "bye"])
def test_robot_names_starting_with_at_are_refused_on_the_public_router(kind):
    with server_thread(FixedBackend()) as server:
        router = server.endpoints["router"]
        with RawDealer(router) as dealer:
            header = {**infer_header(1, robot="@json/1-1"), "type": kind}
            reply = dealer.request(header, infer_arrays() if kind in ("infer", "subtask") else None)
            assert _error_code(reply) == "bad_request", reply
            assert "@" in reply["error"]["message"]
        assert ping(router)["sessions"] == 0


# ============================================================================ restart on the same ports


def test_a_policy_client_is_served_again_after_the_server_is_killed_and_restarted():
    server = ServerProcess("--fixed-reply").start()
    try:
        with PolicyClient(server.router, "arm", timeout_s=1.0, retries=60, connect_timeout_s=60) as client:
            assert client.infer({"base_0_rgb": image()}, "go")["actions"].shape == (50, 32)
            epoch = client.ping()["server"]["epoch"]
            children = server.children()
            server.kill()  # SIGKILL: no goodbye to anyone
            pending = client.start_infer({"base_0_rgb": image()}, "go")  # sent while the server is down
            client.poll(0.3)
            restart = time.monotonic()
            server.start()
            print(f"restarted in {time.monotonic() - restart:.2f} s")
            assert client.wait(pending)["actions"].shape == (50, 32)
            assert client.infer({"base_0_rgb": image()}, "go")["actions"].shape == (50, 32)
            assert client.ping()["server"]["epoch"] != epoch
        assert not wait_pids_gone(children, 5), "the killed server's gateways outlived it"
    finally:
        server.kill()


# ============================================================================ start and stop


def _run(*args: str, timeout_s: float = 60) -> tuple[int, str, float]:
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "runtime.policy_server", *args],
        capture_output=True, text=True, timeout=timeout_s, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    return result.returncode, result.stdout + result.stderr, time.monotonic() - start


def _baseline_start_s() -> float:
    """How long the interpreter takes to import the server and parse its flags here, now."""
    rc, out, elapsed = _run("--help")
    assert rc == 0, out
    return elapsed


@pytest.mark.parametrize("which", ["router", "pub", "ws", "openpi"])
def test_a_port_in_use_is_reported_at_once_with_exit_code_2_in_one_line(which):
    ports = dict(zip(["router", "pub", "ws", "openpi"], free_local_ports(4), strict=True))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", ports[which]))
        busy.listen()
        baseline = _baseline_start_s()
        # Without --fixed-reply: the real engine's path, whose weights must load only after binding.
        rc, out, elapsed = _run(*(arg for name, p in ports.items() for arg in (f"--{name}-port", str(p))))
    assert rc == 2, out
    assert "Traceback" not in out, out
    errors = [line for line in out.splitlines() if " ERROR " in line or line.startswith("ERROR")]
    assert len(errors) == 1 and str(ports[which]) in out, out
    print(f"port in use reported in {elapsed:.2f} s (interpreter and imports alone: {baseline:.2f} s)")
    assert elapsed < 2 * baseline + 0.5, f"took {elapsed:.2f} s against a {baseline:.2f} s baseline: binds too late"


@pytest.mark.parametrize(
    "args",
    [
        ("--router-port", "-1"),
        ("--router-port", "70000"),
        ("--router-port", "65536"),
        ("--pub-port", "x"),
        ("--ws-port", "-5"),
        ("--openpi-port", "1e3"),
        ("--log-level", "verbose"),
    ],
)
def test_bad_flags_are_refused_with_exit_code_2_without_a_traceback(args):
    rc, out, _ = _run(*args, "--fixed-reply")
    assert rc == 2, out
    assert "Traceback" not in out and args[1].lower() in out.lower(), out
    assert "ready (" not in out  # it never served


def _open_port(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


def test_the_ready_file_appears_only_once_every_endpoint_serves_and_names_them():
    server = ServerProcess("--fixed-reply").spawn()
    try:
        assert server.wait_ready(60), server.log
        assert server.ready is not None and server.ready["pid"] == server.proc.pid
        assert server.ready["role"] == "server"
        assert server.ready["endpoints"] == {
            "router": server.router, "pub": server.pub,
            "json websocket": server.ws, "openpi websocket": server.openpi,
        }  # fmt: skip
        assert server.ready["model"] == {
            "config": "pi05_tiny", "checkpoint": None, "trained": False, "label": "pi05_tiny: fixed reply, no model",
        }  # fmt: skip
        ready_line = "ready (server): pi05_tiny: fixed reply, no model; weights: none (fixed reply)"
        assert server.wait_for(lambda line: line.rstrip().endswith(ready_line), 5), server.log
        # Right after the ready file, no retries: each endpoint answers.
        with ws_client.connect(server.ws, open_timeout=5, max_size=None) as connection:
            connection.send('{"images": {"base_0_rgb": [[[0, 0, 0]]]}, "high_level_prompt": "go"}')
            assert '"status": "success"' in connection.recv(timeout=10)
        with ws_client.connect(server.openpi, open_timeout=5, max_size=None) as connection:
            assert isinstance(connection.recv(timeout=10), bytes)  # the metadata frame
        for url in (server.ws, server.openpi):
            with urllib.request.urlopen(url.replace("ws://", "http://") + "/healthz", timeout=5) as response:
                assert response.status == 200
        assert ping(server.router)["healthy"] is True
    finally:
        server.stop()


def test_sigint_stops_the_server_and_its_gateways_promptly():
    server = ServerProcess("--fixed-reply").start()
    startup_s = time.monotonic() - server.started_at
    children = server.children()
    assert len(children) == 2, children
    sent = time.monotonic()
    rc = server.stop(signal.SIGINT)
    shutdown_s = time.monotonic() - sent
    assert rc == 0, server.log
    assert "Traceback" not in server.log, server.log
    assert not wait_pids_gone(children, 5), "gateways outlived the server"
    print(f"start {startup_s:.2f} s, stop {shutdown_s:.2f} s")
    assert shutdown_s < startup_s, f"stopping took {shutdown_s:.2f} s, longer than starting ({startup_s:.2f} s)"
    for port in server.ports:
        assert not _open_port(port), f"port {port} still accepts connections after the server stopped"


def test_systemd_hears_ready_once_serving_and_stopping_at_shutdown(tmp_path):
    """Under systemd (`Type=notify`) the service manager learns readiness from `READY=1` on
    `$NOTIFY_SOCKET`, sent when the ready file is written; `STOPPING=1` when it shuts down, after
    which the ready file is gone."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(str(tmp_path / "notify"))
        manager.settimeout(60)
        server = ServerProcess("--fixed-reply", gateways=False, env={"NOTIFY_SOCKET": str(tmp_path / "notify")})
        server.spawn()
        try:
            first = manager.recv(4096).decode()
            assert first.startswith("READY=1\nSTATUS=serving pi05_tiny"), first
            assert server.ready_file.exists(), "READY=1 came before the ready file"
            assert ping(server.router)["healthy"] is True
            assert server.stop(signal.SIGTERM) == 0, server.log
            assert manager.recv(4096) == b"STOPPING=1"
            assert not server.ready_file.exists(), "the ready file outlived the server"
        finally:
            server.kill()


def test_a_second_sigint_exits_at_once():
    server = ServerProcess("--fixed-reply").start()
    children = server.children()
    try:
        # A gateway that does not respond to SIGTERM makes the orderly stop wait for it (seconds).
        os.kill(children[-1], signal.SIGSTOP)
        mark = len(server.lines)
        assert server.proc is not None
        server.proc.send_signal(signal.SIGINT)
        assert server.wait_for(lambda line: "stopping" in line, 10, start=mark), server.log
        second = time.monotonic()
        server.proc.send_signal(signal.SIGINT)
        rc = server.proc.wait(30)
        print(f"exited {time.monotonic() - second:.2f} s after the second SIGINT")
        assert rc == 130, f"exit code {rc}: the second SIGINT did not exit at once\n{server.log}"
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        server.kill()
    # Gateways left behind notice that their parent is gone and exit by themselves.
    left = wait_pids_gone(children, 10)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"gateways {left} outlived the server"
