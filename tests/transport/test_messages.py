"""Request building from decoded ZMQ messages: every field type- and size-checked, named in errors."""

from __future__ import annotations

import numpy as np
import pytest

from policy.request import Options
from transport import codec, messages
from transport.errors import BadRequest, ProtocolError, describe
from transport.messages import KEEP, build_request, parse_options


def _build(header: dict, arrays: dict | None = None, internal: bool = False) -> messages.Request:
    return build_request({"type": "infer", **header}, arrays or {}, "peer", internal)


def _bad(field: str, header: dict, arrays: dict | None = None) -> str:
    with pytest.raises(BadRequest) as info:
        _build(header, arrays)
    assert info.value.code == "bad_request"
    assert field in info.value.message
    return info.value.message


def test_a_valid_request_round_trips_through_the_wire():
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    obs = messages.Observation({"base_0_rgb": image}, np.array([0.5, -1.0], np.float32), 2.5)
    options = Options(generate_subtask=False, low_level_prompt="grasp", max_decoding_steps=7, temperature=0.0, seed=3)
    header = {"type": "infer", "id": 9, "robot": "arm", "ts": obs.timestamp}
    header["options"] = messages.options_to_wire("pick up the pen", options, 2.0)
    request = build_request(*codec.decode(codec.encode(header, messages.observation_arrays(obs))), "peer")
    assert (request.type, request.id, request.robot, request.prompt) == ("infer", 9, "arm", "pick up the pen")
    assert request.options == options and request.refresh_interval == 2.0
    np.testing.assert_array_equal(request.observation.images["base_0_rgb"], image)
    np.testing.assert_array_equal(request.observation.state, [0.5, -1.0])
    assert request.observation.timestamp == 2.5


@pytest.mark.parametrize("kind", [["infer"], {"a": 1}, None, 1, "nope"])
def test_a_type_that_is_not_a_request_type_is_unknown_type(kind):
    # Issue 9: a list as `type` raised TypeError (unhashable) in the server and stopped the ROUTER.
    with pytest.raises(ProtocolError) as info:
        build_request({"type": kind}, {}, "peer")
    assert info.value.code == "unknown_type"


def test_robot_and_id():
    assert _build({}).robot == "peer"
    assert _build({"robot": "@json-1"}, internal=True).robot == "@json-1"
    _bad("reserved", {"robot": "@json-1"})
    _bad("robot", {"robot": ""})
    _bad("robot", {"robot": "r" * (messages.MAX_ROBOT_CHARS + 1)})
    _bad("robot", {"robot": ["arm"]})
    _bad("id", {"id": [1]})
    _bad("id", {"id": "i" * (codec.MAX_ID_CHARS + 1)})
    _bad("id", {"id": 2**64})


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"temperature": float("inf")}, "temperature"),  # JSON's 1e400
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": 10**400}, "temperature"),  # float() of it raises OverflowError
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": 1e39}, "temperature"),  # inf in float32
        ({"temperature": True}, "temperature"),
        ({"subtask_refresh_interval": float("inf")}, "subtask_refresh_interval"),
        ({"subtask_refresh_interval": 10**400}, "subtask_refresh_interval"),
        ({"subtask_refresh_interval": 0}, "subtask_refresh_interval"),
        ({"subtask_refresh_interval": -1.0}, "subtask_refresh_interval"),
        ({"subtask_refresh_interval": messages.MAX_REFRESH_INTERVAL_S * 2}, "subtask_refresh_interval"),
        ({"subtask_refresh_interval": "1"}, "subtask_refresh_interval"),
        ({"max_decoding_steps": 10**400}, "max_decoding_steps"),
        ({"max_decoding_steps": 2**31}, "max_decoding_steps"),
        ({"max_decoding_steps": 2.0}, "max_decoding_steps"),
        ({"max_decoding_steps": None}, "max_decoding_steps"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"seed": False}, "seed"),
        ({"generate_subtask": 1}, "generate_subtask"),
        ({"high_level_prompt": 5}, "high_level_prompt"),
        ({"high_level_prompt": "go \ud800 there"}, "high_level_prompt"),  # a lone surrogate
        ({"high_level_prompt": "x" * (messages.MAX_PROMPT_BYTES + 1)}, "high_level_prompt"),
        ({"high_level_prompt": "\u20ac" * (messages.MAX_PROMPT_BYTES // 3 + 1)}, "high_level_prompt"),  # bytes
        ({"low_level_prompt": "\udfff"}, "low_level_prompt"),
        ({"low_level_prompt": ["a"]}, "low_level_prompt"),
        ({b"": 1}, "option names must be strings"),  # msgpack allows an empty bin key
        ({"robot": "x"}, "unknown option 'robot'"),
        ({"x" * 100_000: 1}, "unknown option"),
    ],
)
def test_out_of_range_options_name_their_field(options, field):
    message = _bad(field, {"options": options})
    assert len(message) < 400  # no echo of huge values


def test_options_defaults_keep_and_clear():
    assert parse_options(None) == (None, Options(), KEEP)
    assert parse_options({"subtask_refresh_interval": None})[2] is None
    prompt, options, interval = parse_options({"high_level_prompt": "\u20ac" * 1365, "temperature": 2, "seed": 0})
    assert len(prompt.encode()) == 4095 and options.temperature == 2.0 and options.seed == 0 and interval is KEEP
    _bad("options must be a map", {"options": [1]})


def _image(h=2, w=3, dtype=np.uint8) -> np.ndarray:
    return np.zeros((h, w, 3), dtype)


@pytest.mark.parametrize(
    ("arrays", "field"),
    [
        ({"image/base": _image(dtype=np.float32)}, "uint8"),
        ({"image/base": np.zeros((2, 3), np.uint8)}, "uint8"),
        ({"image/base": np.zeros((2, 3, 4), np.uint8)}, "uint8"),
        ({"image/base": _image(0, 3)}, "pixels"),
        ({"image/base": _image(messages.MAX_IMAGE_SIDE + 1, 1)}, "pixels"),
        ({"image/": _image()}, "camera"),
        ({"image/" + "c" * (messages.MAX_CAMERA_CHARS + 1): _image()}, "camera"),
        ({f"image/c{i}": _image() for i in range(messages.MAX_CAMERAS + 1)}, "cameras"),
        ({"state": np.array([1.0, np.nan])}, "state"),
        ({"state": np.array([1.0, np.inf], np.float32)}, "state"),
        ({"state": np.array([1e300])}, "state"),  # finite in float64, inf as the model's float32
        ({"state": np.array([True])}, "state"),
        ({"state": np.zeros((2, 2), np.float32)}, "state"),
        ({"state": np.zeros(0, np.float32)}, "state"),
        ({"state": np.zeros(messages.MAX_STATE_DIM + 1, np.float32)}, "state"),
        ({"actions": np.zeros(2, np.float32)}, "unexpected array 'actions'"),
    ],
)
def test_observation_arrays_are_checked(arrays, field):
    _bad(field, {}, arrays)


def test_integer_and_float16_states_pass_unchanged():
    for state in (np.array([1, -2], np.int64), np.array([np.iinfo(np.uint64).max], np.uint64), np.ones(3, np.float16)):
        assert _build({}, {"state": state}).observation.state is state


@pytest.mark.parametrize("ts", [float("inf"), float("nan"), "1", [1], 10**400, True])
def test_timestamp_must_be_finite(ts):
    _bad("ts", {"ts": ts}, {"state": np.zeros(2, np.float32)})


def test_describe_is_bounded_and_never_raises():
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    assert describe(deep) == "a list"
    assert describe(10**5000) == "an integer of 16610 bits"  # repr() raises ValueError past 4300 digits
    assert describe(-(2**63)) == str(-(2**63))
    assert len(describe("x" * 100_000)) < 80
    assert describe("a\ud800") == "'a\\ud800'"
    assert describe({1: 2}) == "a map" and describe(b"abc") == "3 bytes" and describe(float("inf")) == "inf"
