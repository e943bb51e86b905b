"""Real-time chunking through the live server (the tiny engine, ZMQ, the JSON API and the openpi
port on 127.0.0.1): with a large guidance weight and the `zeros` schedule the new chunk's first d
actions follow the leftover it was sent, and without guidance (none, or beta = 0) a reply is the
plain sampler's, bit for bit.

The tolerance was measured on this model: with beta = 10 and the exact VJP the first d = 8
actions came within 0.056 of the leftover at most and 0.016 on average over ZMQ and the JSON API,
0.083 and 0.025 over the openpi port (its seeds are the server's, and the layout's 8 dims are
padded to the model's 32 with zeros); the unguided sample sits about 1.3 away. beta = 10 corrects
a 10-step flow fully per step, and the weight formula itself leaves about 9% of the error at the
last step, so a larger beta does not get closer (beta = 100: 0.10 at most). The openpi port draws
its own seed for every request: over 40 of them the first d actions came within 0.076 to 0.254 of
the leftover at most and 0.028 to 0.045 on average, so that test has bounds of its own.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tests.support.serving import server_thread
from transport.errors import RemoteError
from transport.ws_client import JsonApiClient, build_request
from transport.zmq_client import PolicyClient

D, S = 8, 20  # inference delay and execution horizon, in steps
BETA = 10.0
TOL_MAX, TOL_MEAN = 0.2, 0.05  # about twice the largest measured error of the guided steps
OPENPI_TOL_MAX, OPENPI_TOL_MEAN = 0.4, 0.08  # the same margin over the server-drawn seeds measured
RTC = {"inference_delay": D, "execute_horizon": S, "rtc_schedule": "zeros", "max_guidance_weight": BETA}
IMAGES = {"base_0_rgb": np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)}
STATE = np.linspace(-0.5, 0.5, 8).astype(np.float32)
PLAIN = {"generate_subtask": False, "max_decoding_steps": 0}


@pytest.fixture(scope="module")
def server(engine):
    with server_thread(engine, "--openpi-layout", "droid") as srv:
        yield srv


def _follows(new: np.ndarray, leftover: np.ndarray, tol_max: float = TOL_MAX, tol_mean: float = TOL_MEAN) -> None:
    err = np.abs(np.asarray(new)[:D] - leftover[:D])
    assert err.max() < tol_max and err.mean() < tol_mean, (err.max(), err.mean())


def test_over_zmq_the_first_d_actions_follow_the_leftover(server):
    with PolicyClient(server.endpoints["router"], "rtc-zmq") as client:
        first = client.infer(IMAGES, "go", STATE, seed=1, **PLAIN)["actions"]
        leftover = first[S:]  # the robot executed s actions of it
        plain = client.infer(IMAGES, "go", STATE, seed=2, **PLAIN)
        guided = client.infer(IMAGES, "go", STATE, seed=2, prev_actions=leftover, **RTC, **PLAIN)
        off = client.infer(
            IMAGES, "go", STATE, seed=2, prev_actions=leftover, **{**RTC, "max_guidance_weight": 0.0}, **PLAIN
        )
        asked = client.infer(IMAGES, "go", STATE, seed=2, return_model_actions=True, **PLAIN)
    _follows(guided["actions"], leftover)
    # It is the guidance that does it: the same seed unguided is far from the leftover.
    assert np.abs(plain["actions"][:D] - leftover[:D]).mean() > 10 * TOL_MEAN
    np.testing.assert_array_equal(off["actions"], plain["actions"])  # beta = 0 is the plain sampler
    # Asking for the chunk in model space changes nothing else; the tiny model's stats are identity.
    np.testing.assert_array_equal(asked["actions"], plain["actions"])
    assert asked["model_actions"].shape == (50, 32) and "model_actions" not in plain
    np.testing.assert_allclose(asked["model_actions"], plain["actions"], atol=1e-6)


def test_over_zmq_the_engine_checks_the_models_ranges(server):
    with PolicyClient(server.endpoints["router"], "rtc-zmq-bad") as client:
        leftover = np.zeros((30, 32), np.float32)
        for bad, field in (
            ({"inference_delay": 26}, "inference_delay"),  # more than half the 50-step horizon
            ({"execute_horizon": 45}, "execute_horizon"),  # more than the horizon minus d
            ({"max_guidance_weight": 1e3}, "max_guidance_weight"),
        ):
            with pytest.raises(RemoteError) as info:
                client.infer(IMAGES, "go", STATE, seed=1, prev_actions=leftover, **{**RTC, **bad}, **PLAIN)
            assert info.value.code == "bad_request" and field in str(info.value)
        with pytest.raises(RemoteError, match="prev_actions") as info:
            client.infer(IMAGES, "go", STATE, seed=1, prev_actions=leftover[:, :7], **RTC, **PLAIN)
        assert info.value.code == "bad_request"
        # Checked on the wire before the engine sees it; the server goes on serving.
        nan = leftover.copy()
        nan[3, 3] = np.nan
        with pytest.raises(RemoteError, match="prev_actions must hold finite numbers"):
            client.infer(IMAGES, "go", STATE, seed=1, prev_actions=nan, **RTC, **PLAIN)
        assert client.infer(IMAGES, "go", STATE, seed=1, **PLAIN)["actions"].shape == (50, 32)


def test_hostile_values_over_the_json_api_and_the_openpi_port_get_typed_errors(server):
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    from robots.adapters import get_adapter

    async def scenario():
        async with JsonApiClient(f"ws://127.0.0.1:{server.ports['ws']}") as client:
            errors = []
            for bad in ({"prev_actions": [[0.0, "x"]]}, {"prev_actions": [[0.0] * 32], "inference_delay": -1}):
                payload = {**build_request(IMAGES, "go", STATE, **RTC, **PLAIN), **bad}  # unconverted
                with pytest.raises(RemoteError) as info:
                    await client.request(payload)
                errors.append((info.value.code, str(info.value)))
            ok = await client.infer(IMAGES, "go", STATE, **PLAIN)  # the connection stays open
            return errors, ok

    errors, ok = asyncio.run(scenario())
    assert errors[0][0] == "bad_request" and "prev_actions[0][1] must be a finite number" in errors[0][1]
    assert errors[1][0] == "bad_request" and "inference_delay" in errors[1][1]
    assert ok["actions"].shape == (1, 50, 32)

    policy = WebsocketClientPolicy(host="127.0.0.1", port=server.ports["openpi"])
    example = get_adapter("droid").example(np.random.default_rng(0))
    with pytest.raises(RuntimeError, match=r"bad_request: prev_actions must be \(n, 8\) for the droid layout"):
        policy.infer({**example, "prev_actions": np.zeros((5, 7)), **RTC})


def test_over_the_json_api_the_same_as_over_zmq(server):
    with PolicyClient(server.endpoints["router"], "rtc-json-ref") as client:
        leftover = client.infer(IMAGES, "go", STATE, seed=1, **PLAIN)["actions"][S:]
        reference = client.infer(IMAGES, "go", STATE, seed=2, prev_actions=leftover, **RTC, **PLAIN)["actions"]
        plain = client.infer(IMAGES, "go", STATE, seed=2, **PLAIN)["actions"]

    async def scenario():
        async with JsonApiClient(f"ws://127.0.0.1:{server.ports['ws']}") as client:
            guided = await client.infer(
                IMAGES, "go", STATE, seed=2, prev_actions=leftover, return_model_actions=True, **RTC, **PLAIN
            )
            unguided = await client.infer(IMAGES, "go", STATE, seed=2, **PLAIN)
            return guided, unguided

    guided, unguided = asyncio.run(scenario())
    _follows(guided["actions"][0], leftover)
    # float32 numbers survive JSON exactly: the same request gives the same chunk on both wires.
    np.testing.assert_array_equal(guided["actions"][0], reference)
    np.testing.assert_array_equal(unguided["actions"][0], plain)
    assert guided["model_actions"].shape == (1, 50, 32) and "model_actions" not in unguided


def test_over_the_openpi_port_with_the_leftover_in_the_layouts_units(server):
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    from robots.adapters import get_adapter

    policy = WebsocketClientPolicy(host="127.0.0.1", port=server.ports["openpi"])
    example = get_adapter("droid").example(np.random.default_rng(0))
    leftover = policy.infer(example)["actions"][S:]  # (30, 8): the droid layout's actions
    assert leftover.shape == (30, 8)
    guided = policy.infer({**example, "prev_actions": leftover, **RTC, "return_model_actions": True})
    unguided = policy.infer(example)
    _follows(guided["actions"], leftover, OPENPI_TOL_MAX, OPENPI_TOL_MEAN)
    assert np.abs(unguided["actions"][:D] - leftover[:D]).mean() > 10 * OPENPI_TOL_MEAN
    assert guided["model_actions"].shape == (50, 32) and "model_actions" not in unguided
    np.testing.assert_allclose(guided["model_actions"][:, :8], guided["actions"], atol=1e-6)
