"""The JSON WebSocket API and openpi's protocol, through their gateway processes, with the real
tiny engine on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import threading

import numpy as np
import pytest
from websockets.asyncio.client import connect

from runtime.policy_server.fixed_backend import FixedBackend
from tests.support.ports import free_local_ports
from tests.support.serving import server_thread
from transport.errors import RemoteError
from transport.ws_client import JsonApiClient, build_request
from transport.zmq_client import PolicyClient


def _image(seed=0, shape=(224, 224, 3)):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_single_request_every_field_of_the_spec(engine):
    async def scenario():
        async with JsonApiClient(f"ws://127.0.0.1:{srv.ports['ws']}") as client:
            request = build_request(
                {"base_0_rgb": _image(0), "left_wrist_0_rgb": _image(1, (96, 128, 3))},
                "Pick up the flashcard",
                state=[0.1, -0.2, 0.3],
                max_decoding_steps=5,
                temperature=0.0,
                subtask_refresh_interval=5.0,
            )
            return await client.request(request)

    with server_thread(engine) as srv:
        reply = asyncio.run(scenario())
    assert reply["status"] == "success"
    actions = np.asarray(reply["actions"])
    assert actions.shape == (1, 50, 32) and np.isfinite(actions).all()
    assert isinstance(reply["subtask"], str)
    assert isinstance(reply["subtask_tokens"], list) and all(isinstance(t, int) for t in reply["subtask_tokens"])
    assert 1 <= len(reply["subtask_tokens"]) <= 5
    assert reply["state"] == pytest.approx([0.1, -0.2, 0.3])
    assert set(reply["timing"]) == {"total_ms", "action_ms", "subtask_ms"}
    assert all(isinstance(v, float) and v > 0 for v in reply["timing"].values())
    assert reply["server_timing"]["total_ms"] >= reply["timing"]["total_ms"]
    assert reply["subtask_refresh_enabled"] is True and reply["subtask_refresh_interval"] == 5.0


def test_batch_two_clients_and_errors_keep_the_connection(engine):
    async def scenario():
        uri = f"ws://127.0.0.1:{srv.ports['ws']}"
        async with JsonApiClient(uri) as a, JsonApiClient(uri) as b:
            batch = [
                build_request({"base_0_rgb": _image(i)}, f"task {i}", generate_subtask=False, seed=i) for i in range(3)
            ]
            results, single = await asyncio.gather(
                a.infer_batch(batch),
                b.infer({"base_0_rgb": _image(0)}, "task 0", generate_subtask=False, seed=0),
            )
            # The batch's first item is the same request as b's single one: the same chunk.
            np.testing.assert_allclose(results[0]["actions"], single["actions"], atol=1e-5)
            assert [r["actions"].shape for r in results] == [(1, 50, 32)] * 3
            errors = {}
            bad = {
                "missing prompt": {"images": {"base_0_rgb": _image().tolist()}},
                "bad image": {"images": {"base_0_rgb": [[1, 2, 3]]}, "high_level_prompt": "x"},
                "bad value": {"images": {"base_0_rgb": [[[0, 0, 300]]]}, "high_level_prompt": "x"},
                "bad batch": {"batch": []},
                "bad batch item": {"batch": [batch[0], {"high_level_prompt": "x"}]},
                "unknown camera": {"images": {"front": _image().tolist()}, "high_level_prompt": "x"},
            }
            for name, payload in bad.items():
                with pytest.raises(RemoteError) as info:
                    await a.request(payload)
                errors[name] = (info.value.code, info.value.message)
                ok = await a.infer({"base_0_rgb": _image(5)}, "recover", generate_subtask=False)
                assert ok["actions"].shape == (1, 50, 32), name
            # Invalid JSON, sent raw on a plain connection, then a good request on it.
            async with connect(uri) as raw:
                await raw.send("{not json")
                invalid = json.loads(await raw.recv())
                await raw.send(json.dumps(batch[1]))
                after = json.loads(await raw.recv())
            return errors, invalid, after, a.timing_stats()

    with server_thread(engine) as srv:
        errors, invalid, after, stats = asyncio.run(scenario())
    assert errors["missing prompt"] == ("bad_request", "high_level_prompt is required (a non-empty string)")
    assert errors["bad image"][0] == "bad_request" and "H x W x 3" in errors["bad image"][1]
    assert "outside 0..255" in errors["bad value"][1]
    assert errors["bad batch"] == ("bad_request", "batch must be a non-empty list of requests")
    assert errors["bad batch item"][0] == "bad_request" and errors["bad batch item"][1].startswith("batch[1]: ")
    assert "unknown camera 'front'" in errors["unknown camera"][1]
    assert invalid["status"] == "error" and invalid["error"]["code"] == "invalid_json"
    assert after["status"] == "success"
    assert stats["count"] >= 13 and stats["p99_ms"] >= stats["p50_ms"] > 0


def test_refresh_pushes_counted_and_stopped_and_the_session_ends_with_the_connection(engine):
    async def until(predicate, timeout_s=60.0):
        async with asyncio.timeout(timeout_s):  # only catches a hang; nothing here is timed
            while not predicate():
                await asyncio.sleep(0.01)

    async def scenario():
        uri = f"ws://127.0.0.1:{srv.ports['ws']}"
        async with JsonApiClient(uri) as client:
            pushed: list[dict] = []
            client.listen_for_refresh_messages(pushed.append)
            first = await client.infer(
                {"base_0_rgb": _image(2)}, "sort", max_decoding_steps=4, subtask_refresh_interval=0.2
            )
            await until(lambda: len(pushed) >= 3)
            cleared = await client.infer(
                {"base_0_rgb": _image(2)}, "sort", generate_subtask=False, subtask_refresh_interval=None
            )
            after_clear = len(pushed)
            again = await client.infer(
                {"base_0_rgb": _image(2)},
                "sort",
                generate_subtask=False,
                max_decoding_steps=4,  # what the refreshes will decode
                subtask_refresh_interval=0.2,
            )
            await until(lambda: len(pushed) >= after_clear + 1)
            refreshing = probe.ping()["server"]["refreshing"]
        await until(lambda: probe.ping()["server"]["refreshing"] == 0)  # the connection closed: its session ended
        return first, cleared, after_clear, again, refreshing, pushed

    with server_thread(engine) as srv, PolicyClient(srv.endpoints["router"], "probe", timeout_s=30) as probe:
        first, cleared, after_clear, again, refreshing, pushed = asyncio.run(scenario())
    assert first["subtask_refresh_enabled"] and first["subtask_refresh_interval"] == 0.2
    assert not cleared["subtask_refresh_enabled"] and cleared["subtask_refresh_interval"] is None
    assert after_clear >= 3 and again["subtask_refresh_enabled"] and refreshing == 1
    # The count runs on for the connection's life, through the clear and the re-enable.
    assert [m["refresh_count"] for m in pushed] == list(range(1, len(pushed) + 1))
    for m in pushed:
        assert set(m) == {"type", "subtask", "subtask_tokens", "refresh_count", "timestamp"}
        assert m["type"] == "subtask_refresh" and isinstance(m["timestamp"], float)


async def _http_get(port: int, path: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    await writer.drain()
    data = await reader.read(4096)
    writer.close()
    return data


def test_healthz_on_both_websocket_servers():
    async def scenario():
        return [await _http_get(srv.ports[name], "/healthz") for name in ("ws", "openpi")]

    with server_thread(FixedBackend()) as srv:
        healthy = asyncio.run(scenario())
        srv_backend = srv._backend
        srv_backend.healthy = False
        broken = asyncio.run(scenario())
    for raw in healthy:
        assert raw.startswith(b"HTTP/1.1 200") and raw.endswith(b"OK\n")
    for raw in broken:
        assert raw.startswith(b"HTTP/1.1 503")


def _run_openpi_clients(port: int, layout: str, out: dict) -> None:
    from openpi_client import action_chunk_broker, websocket_client_policy

    from robots.adapters import get_adapter

    policy = websocket_client_policy.WebsocketClientPolicy(host="127.0.0.1", port=port)
    out["metadata"] = policy.get_server_metadata()
    example = get_adapter(layout).example(np.random.default_rng(0))
    result = policy.infer(example)
    out["actions"] = result["actions"]
    out["server_timing"] = result["server_timing"]
    second = policy.infer(example)
    out["second_timing"] = second["server_timing"]
    broker = action_chunk_broker.ActionChunkBroker(policy, action_horizon=10)
    out["steps"] = [broker.infer(example)["actions"] for _ in range(12)]
    try:
        policy.infer({"prompt": "no cameras"})
    except RuntimeError as e:
        out["error"] = str(e)


@pytest.mark.parametrize(("layout", "dim"), [("droid", 8), ("aloha", 14), ("libero", 7)])
def test_openpi_client_and_action_chunk_broker(engine, layout, dim):
    out: dict = {}
    with server_thread(engine, "--openpi-layout", layout) as srv:
        thread = threading.Thread(target=_run_openpi_clients, args=(srv.ports["openpi"], layout, out))
        thread.start()
        thread.join(120)
    assert out["metadata"]["layout"] == layout and out["metadata"]["action_dim"] == dim
    assert out["actions"].shape == (50, dim)
    assert "infer_ms" in out["server_timing"] and "prev_total_ms" in out["second_timing"]
    assert [s.shape for s in out["steps"]] == [(dim,)] * 12
    # The broker steps through one chunk, then asks for the next.
    chunk = out["steps"][0]
    assert not np.array_equal(out["steps"][1], chunk) or not np.array_equal(out["steps"][10], chunk)
    assert "missing" in out["error"]


def test_json_client_reconnects_after_a_server_restart(engine):
    ports = free_local_ports(4)

    async def scenario():
        client = JsonApiClient(f"ws://127.0.0.1:{ports[2]}", retries=20, backoff_s=0.2)
        with server_thread(engine, ports=ports):
            await client.connect()
            first = await client.infer({"base_0_rgb": _image(0)}, "go", generate_subtask=False, seed=3)
        pending = asyncio.create_task(client.infer({"base_0_rgb": _image(0)}, "go", generate_subtask=False, seed=3))
        await asyncio.sleep(0.3)  # the server is down while the request waits
        with server_thread(engine, ports=ports):
            second = await asyncio.wait_for(pending, 60)
        await client.close()
        return first, second, client.reconnects

    first, second, reconnects = asyncio.run(scenario())
    np.testing.assert_array_equal(first["actions"], second["actions"])
    assert reconnects >= 1


def test_images_load_from_arrays_npy_and_png(tmp_path):
    from PIL import Image

    from transport.ws_client import load_image

    img = _image(4, (20, 30, 3))
    np.save(tmp_path / "a.npy", img)
    Image.fromarray(img).save(tmp_path / "a.png")
    for source in (img, tmp_path / "a.npy", str(tmp_path / "a.png")):
        np.testing.assert_array_equal(load_image(source), img)
    with pytest.raises(FileNotFoundError, match="image file not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="H x W x 3 uint8"):
        load_image(np.zeros((4, 4), np.uint8))


def test_oversize_json_message_gets_a_typed_error_and_the_connection_stays():
    # The message bound is derived from the cameras and the declared resolution (here 32x32).
    async def scenario():
        async with connect(f"ws://127.0.0.1:{srv.ports['ws']}", max_size=None) as raw:
            await raw.send(json.dumps(build_request({"base_0_rgb": _image(0, (100, 100, 3))}, "x")))
            too_big = json.loads(await raw.recv())
            small = build_request({"base_0_rgb": _image(0, (20, 20, 3))}, "x", generate_subtask=False)
            await raw.send(json.dumps(small))
            after = json.loads(await raw.recv())
        return too_big, after

    with server_thread(FixedBackend(image_resolutions=((32, 32),)), "--max-batch", "2") as srv:
        too_big, after = asyncio.run(scenario())
    assert too_big["status"] == "error" and too_big["error"]["code"] == "oversize"
    assert "more than the server's limit of" in too_big["error"]["message"]
    assert after["status"] == "success"
