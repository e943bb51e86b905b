"""The blocking DEALER client against scripted ROUTER and PUB peers on 127.0.0.1: replies matched
by id, Lazy Pirate retries on fresh sockets, an unreachable server reported by the connect
timeout, pipelined requests and refreshes delivered inside `poll`."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import msgpack
import numpy as np
import pytest
import zmq

from tests.support.ports import free_local_ports as free_ports
from transport import codec
from transport.errors import RemoteError, RequestTimeout
from transport.zmq_async_client import AsyncPolicyClient
from transport.zmq_client import PolicyClient
from transport.zmq_requests import ServerUnreachable, zmq_endpoint

Respond = Callable[[dict, int], list[dict]]


def _result(header: dict, value: float, request_id=None) -> dict:
    rid = header["id"] if request_id is None else request_id
    return {"type": "result", "id": rid, "data": {"subtask": None, "value": value}, "_actions": value}


class ScriptedRouter:
    """A ROUTER on a thread; `respond(header, n)` (n: requests seen before) lists the replies to send."""

    def __init__(self, respond: Respond, endpoint: str = "tcp://127.0.0.1:*"):
        self.respond = respond
        self.seen: list[tuple[bytes, dict]] = []
        self.socket = zmq.Context.instance().socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(endpoint)
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.socket.poll(20):
                continue
            identity, *body = self.socket.recv_multipart()
            header, _ = codec.decode(body)
            replies = self.respond(header, len(self.seen))
            self.seen.append((identity, header))
            for reply in replies:
                value = reply.pop("_actions", None)
                arrays = None if value is None else {"actions": np.full((50, 32), value, np.float32)}
                self.socket.send_multipart([identity, *codec.encode(reply, arrays)])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.socket.close(linger=0)

    def __enter__(self) -> ScriptedRouter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


IMAGES = {"base_0_rgb": np.zeros((8, 8, 3), np.uint8)}


def test_the_reply_with_the_request_id_is_returned_and_others_are_dropped():
    # A stray reply (another id) comes first, then the real one.
    with ScriptedRouter(lambda h, n: [_result(h, 7.0, request_id=h["id"] + 1000), _result(h, 1.0 + n)]) as server:
        with PolicyClient(server.endpoint, "arm") as client:
            first = client.infer(IMAGES, "go", np.zeros(3, np.float32), 12.5, generate_subtask=False)
            second = client.infer(IMAGES, "go")
    assert first["value"] == 1.0 and np.all(first["actions"] == 1.0) and first["actions"].shape == (50, 32)
    assert second["value"] == 2.0 and np.all(second["actions"] == 2.0)
    header = server.seen[0][1]
    assert header["robot"] == "arm" and header["ts"] == 12.5 and header["type"] == "infer"
    assert header["options"]["high_level_prompt"] == "go" and header["options"]["generate_subtask"] is False


def test_a_timed_out_request_is_sent_again_on_a_fresh_socket():
    # The first copy of every request is ignored; the second is answered.
    with ScriptedRouter(lambda h, n: [] if n % 2 == 0 else [{"type": "pong", "id": h["id"], "data": {"n": n}}]) as s:
        with PolicyClient(s.endpoint, "arm", timeout_s=0.3, retries=2) as client:
            assert client.ping() == {"n": 1}
            assert client.reconnects == 1
    (first_socket, first), (second_socket, second) = s.seen
    assert first["id"] == second["id"] and first_socket != second_socket


def test_after_every_retry_the_request_times_out():
    with ScriptedRouter(lambda h, n: []) as server:
        with PolicyClient(server.endpoint, "arm", timeout_s=0.2, retries=2) as client:
            with pytest.raises(RequestTimeout, match="no reply to a ping request") as info:
                client.ping()
    assert not isinstance(info.value, ServerUnreachable)
    assert len(server.seen) == 3 and len({identity for identity, _ in server.seen}) == 3


def test_an_unreachable_server_is_reported_by_the_connect_timeout():
    (port,) = free_ports(1)
    with PolicyClient(f"127.0.0.1:{port}", "arm", timeout_s=60, retries=3, connect_timeout_s=0.5) as client:
        started = time.monotonic()
        with pytest.raises(ServerUnreachable, match=rf"cannot reach the policy server at tcp://127.0.0.1:{port}"):
            client.ping()
        elapsed = time.monotonic() - started
    assert elapsed < 60  # not the request timeout: no connection was ever made
    assert not client.connected


def test_a_server_that_comes_up_within_the_connect_timeout_is_served():
    (port,) = free_ports(1)
    endpoint = f"tcp://127.0.0.1:{port}"
    with PolicyClient(endpoint, "arm", timeout_s=30, connect_timeout_s=30) as client:
        future = client.send("ping")
        client.poll(0.2)
        assert not future.done() and not client.connected
        with ScriptedRouter(lambda h, n: [{"type": "pong", "id": h["id"], "data": {}}], endpoint):
            assert client.wait(future) == {} and client.connected


def test_pipelined_requests_resolve_in_any_order_and_errors_are_typed():
    def respond(header: dict, n: int) -> list[dict]:
        if n == 0:
            return []  # held back, answered after the second
        if n == 1:
            return [_result(header, 2.0), {**_result(server.seen[0][1], 1.0)}]
        return [{"type": "error", "id": header["id"], "error": {"code": "bad_request", "message": "no"}}]

    with ScriptedRouter(respond) as server, PolicyClient(server.endpoint, "arm") as client:
        a = client.start_infer(IMAGES, "go", timeout_s=10, retries=0)
        b = client.start_infer(IMAGES, "go", timeout_s=10, retries=0)
        while not (a.done() and b.done()):
            client.poll(0.05)
        with pytest.raises(RemoteError, match="no") as info:
            client.infer(IMAGES, "go")
    assert a.result()["value"] == 1.0 and b.result()["value"] == 2.0
    assert info.value.code == "bad_request"


def test_a_cancelled_request_is_forgotten_and_its_late_reply_dropped():
    release = threading.Event()

    def respond(header: dict, n: int) -> list[dict]:
        if n == 0:
            release.wait(5)  # answers the first request only once it was abandoned
        return [_result(header, float(n))]

    with ScriptedRouter(respond) as server, PolicyClient(server.endpoint, "arm", timeout_s=0.3, retries=0) as client:
        abandoned = client.start_infer(IMAGES, "go")
        abandoned.cancel()
        client.poll(0)
        release.set()
        later = client.infer(IMAGES, "go")
    assert abandoned.cancelled() and later["value"] == 1.0  # not the abandoned request's 0.0
    assert client.reconnects == 0 and [h["id"] for _, h in server.seen] == [1, 2]


def test_refreshes_are_delivered_inside_poll_once_each_and_only_this_robots():
    xpub = zmq.Context.instance().socket(zmq.XPUB)
    xpub.setsockopt(zmq.LINGER, 0)
    xpub.bind("tcp://127.0.0.1:*")
    endpoint = xpub.getsockopt_string(zmq.LAST_ENDPOINT)
    (port,) = free_ports(1)
    seen: list[dict] = []
    try:
        with PolicyClient(f"127.0.0.1:{port}", "r7", connect_timeout_s=30) as client:
            client.listen_refreshes(endpoint, seen.append)
            assert xpub.poll(5000) and xpub.recv() == b"\x01r7"  # the subscription arrived

            def publish(topic: bytes, seq: int, epoch: float) -> None:
                xpub.send_multipart([topic, msgpack.packb({"seq": seq, "epoch": epoch, "subtask": f"{topic!r}{seq}"})])

            publish(b"r7", 1, 1.0)
            publish(b"r70", 2, 1.0)  # another robot whose id starts with this one's
            publish(b"r7", 1, 1.0)  # replayed
            publish(b"r7", 1, 2.0)  # a restarted server counts again from 1
            publish(b"r7", 3, 2.0)
            assert seen == []  # nothing is delivered outside the client's calls
            deadline = time.monotonic() + 10
            while len(seen) < 3 and time.monotonic() < deadline:
                client.poll(0.05)
    finally:
        xpub.close(linger=0)
    assert [(m["seq"], m["epoch"]) for m in seen] == [(1, 1.0), (1, 2.0), (3, 2.0)]


@pytest.mark.parametrize(
    ("address", "endpoint"),
    [
        ("localhost:5555", "tcp://localhost:5555"),
        ("tcp://10.0.0.2:80", "tcp://10.0.0.2:80"),
        ("[::1]:5555", "tcp://[::1]:5555"),
        ("ipc:///tmp/policy", "ipc:///tmp/policy"),
    ],
)
def test_endpoints_accept_host_port(address, endpoint):
    assert zmq_endpoint(address) == endpoint


@pytest.mark.parametrize("address", ["localhost", "localhost:0", "host:70000", "tcp://host:http", ":5555"])
def test_bad_endpoints_are_refused_with_what_is_expected(address):
    with pytest.raises(ValueError, match="expected host:port or tcp://host:port"):
        zmq_endpoint(address)


# ---------------------------------------------------------------------- the asyncio driver of the same core


def test_the_asyncio_client_returns_what_the_blocking_client_returns():
    def respond(header: dict, n: int) -> list[dict]:
        if header["type"] == "ping":
            return [{"type": "pong", "id": header["id"], "data": {"n": n}}]
        return [_result(header, 3.0)]

    with ScriptedRouter(respond) as server:
        with PolicyClient(server.endpoint, "arm") as client:
            blocking = (client.infer(IMAGES, "go", generate_subtask=False), client.request("ping"))

        async def scenario():
            async with AsyncPolicyClient(server.endpoint, "arm") as client:
                return await client.infer(IMAGES, "go", generate_subtask=False), await client.request("ping")

        asynchronous = asyncio.run(scenario())
    for ours, theirs in zip(blocking, asynchronous, strict=True):
        assert ours.keys() == theirs.keys()  # one reply shape: the data, an infer's actions among it
    assert np.array_equal(blocking[0]["actions"], asynchronous[0]["actions"]) and blocking[0]["value"] == 3.0
    assert (blocking[1], asynchronous[1]) == ({"n": 1}, {"n": 3})
    sent = [h for _, h in server.seen]
    assert [h["type"] for h in sent] == ["infer", "ping"] * 2 and [h["id"] for h in sent] == [1, 2, 1, 2]


def test_the_asyncio_client_resends_on_a_fresh_socket_then_times_out():
    def respond(header: dict, n: int) -> list[dict]:
        if header["id"] == 1 and n == 1:
            return [{"type": "pong", "id": 1, "data": {}}]  # the first request's second copy
        return []

    async def scenario():
        async with AsyncPolicyClient(server.endpoint, "arm", timeout_s=0.3, retries=1) as client:
            answered = await client.ping()
            with pytest.raises(RequestTimeout, match="no reply to a ping request"):
                await client.ping()
            return answered, client.reconnects

    with ScriptedRouter(respond) as server:
        answered, reconnects = asyncio.run(scenario())
    assert answered == {} and reconnects == 3  # the last timeout leaves a fresh socket too
    identities = [identity for identity, _ in server.seen]
    assert [h["id"] for _, h in server.seen] == [1, 1, 2, 2]
    assert identities[0] != identities[1] == identities[2] != identities[3]  # each copy on a new socket


def test_the_asyncio_client_reports_an_unreachable_server_by_the_connect_timeout():
    (port,) = free_ports(1)

    async def scenario():
        async with AsyncPolicyClient(f"127.0.0.1:{port}", "arm", timeout_s=60, connect_timeout_s=0.3) as client:
            with pytest.raises(ServerUnreachable, match=rf"cannot reach the policy server at tcp://127.0.0.1:{port}"):
                await client.ping()
            return client.connected

    assert asyncio.run(asyncio.wait_for(scenario(), 30)) is False  # 30 s: only a hang fails here
