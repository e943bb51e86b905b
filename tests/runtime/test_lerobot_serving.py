"""A LeRobot fine-tune from the Hugging Face hub, served on every wire with its own camera names.

The README's promise for a LeRobot user: `python -m runtime.policy_server --checkpoint
hf://OWNER/REPO` serves the fine-tune (its config, cameras, state and actions, not the demo's),
and a robot reaches it over ZMQ, the JSON WebSocket API and openpi's protocol naming its cameras as
its dataset does (`observation.images.front`, or `front`). The hub is the LeRobot fixture, downloaded
into huggingface_hub's cache by huggingface_hub from a fake Hub, then read offline by the server
process from its environment as a user's would be. The same inputs and seed give the same chunk on
ZMQ and JSON; the openpi protocol carries no seed, so its chunk is checked for the fine-tune's shape.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from openpi_client import msgpack_numpy as openpi_msgpack_numpy
from openpi_client.websocket_client_policy import WebsocketClientPolicy

from tests.support.hf_cache import cache_repo
from tests.support.openpi_exchange import openpi_exchange
from tests.support.server_process import ServerProcess
from transport.ws_client import JsonApiClient, build_request
from transport.zmq_client import PolicyClient

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "lerobot_pi05_tiny"
REPO = "someone/pi05-tiny-finetune"
PROMPT = "put the cube in the bowl"
SEED = 7
CAP_S = 60.0  # failure detection only
HORIZON, ACTION_DIM = 10, 6  # the fixture's chunk and its robot's (an SO-101's) action size


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    home = tmp_path_factory.mktemp("hf_home")
    cache_repo(home / "hub", REPO, FIXTURE / "checkpoint")
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(home)}
    with ServerProcess("--checkpoint", f"hf://{REPO}", "--openpi-layout", "lerobot", env=env) as srv:
        yield srv


@pytest.fixture(scope="module")
def inputs() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Two camera frames at a webcam's resolution (the server resizes them) and a 6-joint state."""
    rng = np.random.default_rng(0)
    frames = {name: rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for name in ("front", "wrist")}
    return frames, rng.uniform(-1, 1, ACTION_DIM)


def test_the_ready_file_names_the_checkpoints_own_model(server):
    model = server.ready["model"]
    assert model["config"] == f"lerobot:hf://{REPO}" and model["trained"] is True
    with PolicyClient(server.router, "probe", timeout_s=60) as client:
        info = client.ping()["model"]
    assert info["action_horizon"] == HORIZON and info["action_dim"] == ACTION_DIM and info["state_dim"] == 6
    assert info["camera_aliases"]["observation.images.front"] == info["camera_aliases"]["front"] == "base_0_rgb"


def test_zmq_and_json_give_the_same_chunk_with_the_fine_tunes_camera_names(server, inputs):
    frames, state = inputs
    with PolicyClient(server.router, "so101", timeout_s=60) as client:
        zmq_reply = client.infer(
            {f"observation.images.{name}": frame for name, frame in frames.items()},
            PROMPT, state=state, seed=SEED, generate_subtask=False,
        )  # fmt: skip

    async def json_request() -> dict:
        async with JsonApiClient(server.ws) as client:
            return await client.request(build_request(frames, PROMPT, state=state, seed=SEED, generate_subtask=False))

    json_reply = asyncio.run(json_request())
    assert json_reply["status"] == "success"
    zmq_actions, json_actions = np.asarray(zmq_reply["actions"]), np.asarray(json_reply["actions"])
    assert zmq_actions.shape == (HORIZON, ACTION_DIM) and json_actions.shape == (1, HORIZON, ACTION_DIM)
    assert np.isfinite(zmq_actions).all()
    np.testing.assert_allclose(json_actions[0], zmq_actions, rtol=1e-5, atol=1e-5)


def test_openpi_client_with_the_lerobot_layout(server, inputs):
    """An openpi client sending LeRobot's observation names gets the fine-tune's robot actions, and
    its real-time chunking leftover is taken in those units."""
    frames, state = inputs
    observation = {
        **{f"observation.images.{name}": frame for name, frame in frames.items()},
        "observation.state": state,
        "task": PROMPT,
    }
    policy = WebsocketClientPolicy(host="127.0.0.1", port=server.ports[3])
    metadata = policy.get_server_metadata()
    assert metadata["layout"] == "lerobot" and metadata["config"] == f"lerobot:hf://{REPO}"
    assert metadata["action_dim"] == ACTION_DIM and metadata["action_horizon"] == HORIZON
    actions = policy.infer(observation)["actions"]
    assert actions.shape == (HORIZON, ACTION_DIM) and np.isfinite(actions).all()
    leftover = {"prev_actions": actions[3:], "inference_delay": 2, "execute_horizon": 5}
    guided = policy.infer({**observation, **leftover})["actions"]
    assert guided.shape == (HORIZON, ACTION_DIM) and np.isfinite(guided).all()


def _hostile_lerobot_observation(rng: np.random.Generator, frames: dict[str, np.ndarray], state: np.ndarray) -> bytes:
    """A LeRobot-named observation with one to three keys given hostile values: wrong types, dtypes,
    shapes and sizes, unknown or missing cameras, a state of another length, a prompt of odds."""
    obs: dict = {
        **{f"observation.images.{name}": frame for name, frame in frames.items()},
        "observation.state": state,
        "task": PROMPT,
    }
    hostile = [
        None, 7, -1.5, "", "x" * 100_000, b"\x00\xff", [], [1, [2, [3]]], {"a": {"b": 1}},
        np.zeros((0, 3), np.uint8), np.zeros((4096, 4097, 3), np.uint8)[:2], np.ones((224, 224), np.float64),
        np.full((224, 224, 3), np.nan, np.float32), np.zeros((3, 224, 224), np.int64), np.zeros(10**5, np.float32),
        np.zeros((224, 224, 3), np.float16), np.full(6, np.inf, np.float32), np.zeros((2, 2, 2, 2), np.uint8),
    ]  # fmt: skip
    keys = [*obs, "observation.images.third", "prompt", "prev_actions", "inference_delay", "observation.environment"]
    for _ in range(int(rng.integers(1, 4))):
        key = keys[int(rng.integers(len(keys)))]
        if rng.random() < 0.15:
            obs.pop(key, None)
        else:
            obs[key] = hostile[int(rng.integers(len(hostile)))]
    return openpi_msgpack_numpy.packb(obs)  # openpi's own packer: any dtype travels, as from a stranger


def test_hostile_lerobot_observations_get_error_frames_and_well_formed_ones_are_served(server, inputs):
    """60 mutated observations on the openpi port with the lerobot layout: each answered with the
    fine-tune's actions or an `Error: ...` frame (never `internal`) and a 1011 close; then openpi's own
    client is served, and the gateway's memory stayed flat."""
    frames, state = inputs
    rng = np.random.default_rng(3)
    before = server.rss_mb()["openpi gateway"]
    problems = []
    for _ in range(60):
        message = _hostile_lerobot_observation(rng, frames, state)
        problem = openpi_exchange(server.openpi, message, reply_timeout_s=CAP_S)
        if problem is not None:
            problems.append(problem)
    assert not problems, problems[:5]
    policy = WebsocketClientPolicy(host="127.0.0.1", port=server.ports[3])
    observation = {f"observation.images.{n}": f for n, f in frames.items()}
    observation |= {"observation.state": state, "task": PROMPT}
    assert policy.infer(observation)["actions"].shape == (HORIZON, ACTION_DIM)
    assert server.rss_mb()["openpi gateway"] - before < 100
