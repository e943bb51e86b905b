"""CURVE on the policy server's ZMQ endpoints, end to end on 127.0.0.1 with the fixed backend:
only allowed keys are served, and a robot's session and refreshes belong to its key."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import zmq

from runtime.policy_server.fixed_backend import FixedBackend
from tests.support.keys import any_reply, make_keys
from tests.support.serving import zmq_server_thread
from transport.curve import ClientKeys, apply_client, session_key
from transport.refresh_listener import RefreshListener
from transport.zmq_async_client import AsyncPolicyClient
from transport.zmq_client import PolicyClient
from transport.zmq_requests import ServerUnreachable

# How long a refused client is watched for a reply, and a bound on waits for what must come: a
# reply within the first, or nothing within the second, is the failure these tests detect.
MUST_COME_S = 20.0
IMAGES = {"base_0_rgb": np.zeros((8, 8, 3), np.uint8)}


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return make_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def server(keys):
    with zmq_server_thread(FixedBackend(), *keys.server_flags(), "--min-refresh-interval", "0.05") as srv:
        yield srv


def _client(server, keys: ClientKeys | None, robot: str = "arm", **kw) -> PolicyClient:
    return PolicyClient(server.endpoints["router"], robot, keys=keys, timeout_s=5.0, retries=0, **kw)


def test_only_allowed_keys_are_served(server, keys):
    router = server.endpoints["router"]
    assert not any_reply(router, None), "a client without a key was answered"
    assert not any_reply(router, keys.client("stranger")), "a key not on the list was answered"
    assert any_reply(router, keys.client("robot-a"))

    with _client(server, keys.client("robot-a")) as allowed:
        reply = allowed.infer(IMAGES, "pick up the cup", generate_subtask=False)
        allowed.bye()
    assert reply["actions"].shape[0] > 0
    # The robot's own client says why it gets nothing, instead of timing out in silence.
    with _client(server, keys.client("stranger"), connect_timeout_s=1.0) as refused:
        with pytest.raises(ServerUnreachable, match="refused this client's CURVE key"):
            refused.ping()
    with _client(server, None, connect_timeout_s=1.0) as keyless:
        with pytest.raises(ServerUnreachable, match="handshake failed"):
            keyless.ping()


def test_a_robot_name_from_another_key_is_another_session(server, keys):
    a_keys, b_keys = keys.client("robot-a"), keys.client("robot-b")
    with _client(server, a_keys, "twin") as a, _client(server, b_keys, "twin") as b:
        before = a.ping()["server"]["sessions"]
        a.infer(IMAGES, "task of a", generate_subtask=False)
        assert a.ping()["server"]["sessions"] == before + 1
        # b names the same robot: it can neither end a's session nor see its state.
        assert b.bye()["dropped"] is False
        assert b.request("refresh")["waiting_for_observation"] is True  # a session of its own, empty
        assert a.request("refresh")["waiting_for_observation"] is False
        b.infer(IMAGES, "task of b", generate_subtask=False)
        assert b.ping()["server"]["sessions"] == before + 2
        assert a.bye()["dropped"] is True and b.bye()["dropped"] is True


def test_a_subscriber_gets_its_own_topics_only(server, keys):
    a_keys, b_keys = keys.client("robot-a"), keys.client("robot-b")
    a_topic, b_topic = session_key(a_keys.user, "arm"), session_key(b_keys.user, "arm")
    pub = server.endpoints["pub"]
    # b tries every way into a's refreshes (the catch-all, a's user prefix, a's exact topic) on
    # the same socket as its own topic, which must work.
    spy = zmq.Context.instance().socket(zmq.SUB)
    spy.setsockopt(zmq.LINGER, 0)
    apply_client(spy, b_keys)
    for topic in (b"", a_keys.user.encode(), a_topic.encode(), b_topic.encode()):
        spy.setsockopt(zmq.SUBSCRIBE, topic)
    spy.connect(pub)
    a_seen: list[dict] = []
    with _client(server, a_keys) as a, _client(server, b_keys) as b:
        a.listen_refreshes(pub, a_seen.append)
        a.set_refresh(0.05, IMAGES, "task of a")
        b.set_refresh(0.05, IMAGES, "task of b")
        topics: list[bytes] = []
        deadline = time.monotonic() + MUST_COME_S
        while (len(topics) < 5 or len(a_seen) < 5) and time.monotonic() < deadline:
            a.poll(0.05)
            while spy.poll(0):
                topics.append(spy.recv_multipart()[0])
        a.set_refresh(None)
        b.set_refresh(None)
        a.bye()
        b.bye()
    spy.close()
    assert len(a_seen) >= 5, "robot a never got its own refreshes"
    assert len(topics) >= 5, "robot b never got its own refreshes"
    assert set(topics) == {b_topic.encode()}, "a subscriber received another user's refreshes"


def test_asyncio_client_and_refresh_listener_under_curve(server, keys):
    a_keys = keys.client("robot-a")

    async def scenario() -> tuple[dict, list[dict]]:
        seen: list[dict] = []
        got = asyncio.Event()

        def on_refresh(message: dict) -> None:
            seen.append(message)
            got.set()

        listener = RefreshListener(server.endpoints["pub"], "async-arm", on_refresh, keys=a_keys)
        listening = asyncio.create_task(listener.run())
        async with AsyncPolicyClient(server.endpoints["router"], "async-arm", keys=a_keys, timeout_s=5.0) as client:
            reply = await client.infer(IMAGES, "pick up the cup", generate_subtask=False)
            await client.set_refresh(0.05)
            await asyncio.wait_for(got.wait(), MUST_COME_S)
            await client.set_refresh(None)
            await client.bye()
        listening.cancel()
        await asyncio.gather(listening, return_exceptions=True)
        return reply, seen

    reply, seen = asyncio.run(scenario())
    assert reply["actions"].shape[0] > 0
    assert seen[0]["robot"] == session_key(a_keys.user, "async-arm")
