"""The ZMQ ROUTER/XPUB server with the real tiny engine, over real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
import zmq.asyncio

from runtime.policy_server.service import PolicyService
from tests.support.ports import free_local_ports
from transport import codec
from transport.admission import AdmissionLimits
from transport.errors import RemoteError
from transport.refresh_listener import RefreshListener
from transport.zmq_async_client import AsyncPolicyClient
from transport.zmq_server import ZmqServer, ZmqServerSettings


@contextlib.asynccontextmanager
async def serving(engine, router: str = "tcp://127.0.0.1:*", pub: str | None = "tcp://127.0.0.1:*", **settings: Any):
    server = ZmqServer(
        ZmqServerSettings(router_endpoint=router, pub_endpoints=(pub,) if pub else (), **settings),
        lambda peer, request: service.handle(peer.principal, request),
    )
    await server.start()
    service = PolicyService(engine, server.publish, server.subscribers, server.forget)
    try:
        yield server, service
    finally:
        await service.close()
        await server.close()


def _obs(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"base_0_rgb": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)}


def test_eight_dealers_in_parallel_get_their_own_replies(engine):
    before = collections.Counter(engine.batch_counts)

    async def scenario():
        async with serving(engine) as (server, _):
            ctx = zmq.asyncio.Context.instance()
            dealers = [ctx.socket(zmq.DEALER) for _ in range(8)]
            for d in dealers:
                d.connect(server.router_endpoint)
            for i, d in enumerate(dealers):
                header = {
                    "type": "infer",
                    "id": 1000 + i,
                    "robot": f"robot-{i}",
                    "ts": 12.5 + i,
                    "options": {"high_level_prompt": f"task {i}", "generate_subtask": False, "seed": i},
                }
                arrays = {"image/base_0_rgb": _obs(i)["base_0_rgb"], "state": np.full(3, i / 10, np.float32)}
                await d.send_multipart(codec.encode(header, arrays), copy=False)
            replies = await asyncio.gather(*(d.recv_multipart() for d in dealers))
            for d in dealers:
                d.close(linger=0)
            return replies

    replies = asyncio.run(scenario())
    chunks = []
    for i, frames in enumerate(replies):
        header, arrays = codec.decode(frames)
        assert header["type"] == "result" and header["id"] == 1000 + i and header["robot"] == f"robot-{i}"
        data = header["data"]
        assert data["obs_timestamp"] == 12.5 + i
        assert data["state"] == pytest.approx([i / 10] * 3)
        assert data["server_timing"]["total_ms"] >= data["timing"]["total_ms"] > 0
        assert arrays["actions"].shape == (50, 32) and arrays["actions"].dtype == np.float32
        chunks.append(arrays["actions"])
    assert len({c.tobytes() for c in chunks}) == 8  # each got its own answer
    batched = collections.Counter(engine.batch_counts) - before
    # The eight requests ran in fewer than eight model calls.
    assert sum(n for (phase, rows), n in batched.items() if phase == "action" and rows > 1) >= 1, batched


def test_client_api_infer_subtask_ping_and_errors(engine):
    async def scenario():
        async with serving(engine) as (server, _), AsyncPolicyClient(server.router_endpoint, "arm") as client:
            pong = await client.ping()
            assert pong["model"]["config"] == "pi05_tiny" and pong["server"]["protocol"] == 1
            out = await client.infer(_obs(), "pick up the pen", state=np.zeros(2, np.float32), max_decoding_steps=4)
            assert out["actions"].shape == (50, 32) and len(out["subtask_tokens"]) <= 4
            sub = await client.subtask(_obs(), "pick up the pen", max_decoding_steps=3, seed=1)
            assert isinstance(sub["subtask"], str) and sub["timing"]["subtask_ms"] > 0
            with pytest.raises(RemoteError, match="high_level_prompt is required") as missing:
                await client.request("infer", None, None)
            assert missing.value.code == "bad_request"
            with pytest.raises(RemoteError, match="H x W x 3 uint8") as bad_image:
                await client.infer({"base_0_rgb": np.zeros((224, 224, 3), np.float32)}, "go")
            assert bad_image.value.code == "bad_request"
            # Still served after the errors.
            again = await client.infer(_obs(), "go", generate_subtask=False)
            assert again["actions"].shape == (50, 32)

    asyncio.run(scenario())


def test_malformed_messages_get_typed_errors_while_others_are_served(engine):
    async def scenario():
        async with serving(engine, admission=AdmissionLimits(max_message_bytes=300_000)) as (server, _):
            ctx = zmq.asyncio.Context.instance()
            bad = ctx.socket(zmq.DEALER)
            bad.connect(server.router_endpoint)
            good = AsyncPolicyClient(server.router_endpoint, "good")
            await good.connect()
            good_task = asyncio.create_task(good.infer(_obs(), "keep going", generate_subtask=False))
            head = {"v": 1, "type": "infer", "id": 5, "options": {"high_level_prompt": "x"}}
            desc = [{"name": "image/base_0_rgb", "dtype": "|u1", "shape": [224, 224, 3]}]
            big = np.zeros((3, 224, 224, 3), np.uint8)
            cases = {
                "missing frames": [msgpack.packb({**head, "arrays": desc})],
                "wrong sizes": [msgpack.packb({**head, "arrays": desc}), b"\x00" * 10],
                "bad header": [b"\xc1\xc1", b"x"],
                "unknown type": [msgpack.packb({**head, "type": "dance", "arrays": []})],
                "oversize": [
                    msgpack.packb(
                        {**head, "arrays": [{"name": "image/base_0_rgb", "dtype": "|u1", "shape": list(big.shape)}]}
                    ),
                    big.tobytes(),
                ],
                "bad option": [msgpack.packb({**head, "arrays": [], "options": {"temperature": "hot"}})],
            }
            codes = {}
            for name, frames in cases.items():
                await bad.send_multipart(frames)
                reply, _ = codec.decode(await asyncio.wait_for(bad.recv_multipart(), 10))
                assert reply["type"] == "error", name
                codes[name] = (reply["error"]["code"], reply["id"], reply["error"]["message"])
            good_reply = await asyncio.wait_for(good_task, 30)
            bad.close(linger=0)
            await good.close()
            return codes, good_reply

    codes, good_reply = asyncio.run(scenario())
    assert codes["missing frames"][:2] == ("bad_frames", 5)
    assert codes["wrong sizes"][0] == "bad_frames" and "needs 150528 bytes" in codes["wrong sizes"][2]
    assert codes["bad header"][:2] == ("bad_header", None)
    assert codes["unknown type"][0] == "unknown_type" and "'dance'" in codes["unknown type"][2]
    assert codes["oversize"][:2] == ("oversize", 5)
    assert codes["bad option"][0] == "bad_request" and "temperature" in codes["bad option"][2]
    assert good_reply["actions"].shape == (50, 32)


async def _until(predicate, timeout_s: float = 60.0) -> None:
    """Waits for an event (a generous timeout only catches a hang; nothing here is timed)."""
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.01)


def test_refresh_on_sub_until_cleared_and_only_to_its_robot(engine):
    interval = 0.2

    async def scenario():
        async with (
            serving(engine) as (server, service),
            AsyncPolicyClient(server.router_endpoint, "r7") as client,
            AsyncPolicyClient(server.router_endpoint, "r8") as neighbour,
        ):
            pub = server.pub_endpoints[0]
            seen: list[dict] = []
            prefix_only: list[dict] = []
            tasks = [
                asyncio.create_task(RefreshListener(pub, "r7", seen.append).run()),
                asyncio.create_task(RefreshListener(pub, "r", prefix_only.append).run()),
            ]
            # Both subscriptions reached the server (or the prefix listener would see nothing anyway).
            await _until(lambda: server.publisher.subscriptions() == {b"r7": 1, b"r": 1})
            await neighbour.set_refresh(interval, _obs(4), "stack the cups", max_decoding_steps=4)
            ack = await client.set_refresh(interval, _obs(3), "sort the blocks", max_decoding_steps=6)
            assert ack["subtask_refresh_enabled"] and ack["subtask_refresh_interval"] == interval
            await _until(lambda: len(seen) >= 3)
            ack = await client.set_refresh(None)
            assert not ack["subtask_refresh_enabled"]
            n_after_clear = len(seen)
            neighbour_count = service.scheduler.state("r8")
            # Three more intervals: the neighbour keeps refreshing, r7 gets nothing more.
            published = server.publisher.published
            await _until(lambda: server.publisher.published >= published + 3)
            late: list[dict] = []
            tasks.append(asyncio.create_task(RefreshListener(pub, "r7", late.append).run()))
            await _until(lambda: bool(late))
            last = (await client.request("refresh"))["last"]  # a bare refresh asks for it
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return seen, n_after_clear, late, last, prefix_only, neighbour_count

    seen, n_after_clear, late, last, prefix_only, neighbour = asyncio.run(scenario())
    assert neighbour is not None  # the neighbour was refreshing all along
    assert [m["refresh_count"] for m in seen] == list(range(1, len(seen) + 1))  # increasing from 1
    assert len(seen) == n_after_clear  # nothing once cleared
    for m in seen:
        assert isinstance(m["subtask"], str) and isinstance(m["subtask_tokens"], list)
        assert m["robot"] == "r7" and m["timestamp"] > 0
    assert prefix_only == []  # a subscriber of "r" gets neither r7's nor r8's refreshes
    assert [m["seq"] for m in seen] == sorted(m["seq"] for m in seen)
    # A late subscriber gets the last value at once, and it can also be asked for.
    assert late[-1]["refresh_count"] == seen[-1]["refresh_count"]
    assert last["refresh_count"] == seen[-1]["refresh_count"]


def test_client_rides_through_a_server_restart(engine):
    (port,) = free_local_ports(1)
    endpoint = f"tcp://127.0.0.1:{port}"

    async def scenario():
        client = AsyncPolicyClient(endpoint, "phoenix", timeout_s=1.5, retries=6)
        await client.connect()
        async with serving(engine, router=endpoint, pub=None):
            first = await client.infer(_obs(), "go", generate_subtask=False, seed=1)
        pending = asyncio.create_task(client.infer(_obs(), "go", generate_subtask=False, seed=1))
        await asyncio.sleep(1.0)  # the server is down while the request waits
        async with serving(engine, router=endpoint, pub=None):
            second = await asyncio.wait_for(pending, 20)
            third = await client.infer(_obs(), "go", generate_subtask=False, seed=1)
        await client.close()
        return first, second, third

    first, second, third = asyncio.run(scenario())
    # The same seed and observation give the same chunk. Not bit for bit: the waiting request and
    # its resend can reach the new server together and run as one batch of two, whose compiled
    # executable rounds differently (seen: 7e-7). Another seed differs by O(1).
    np.testing.assert_allclose(first["actions"], second["actions"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(first["actions"], third["actions"], rtol=0, atol=1e-5)
