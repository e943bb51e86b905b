"""Real-time chunking's inputs on every wire: `prev_actions` and its options parsed into the
request's `ChunkGuidance`, each value type- and range-checked with an error naming the field."""

from __future__ import annotations

import json

import numpy as np
import pytest

from policy.request import ChunkGuidance, Observation
from robots.adapters import ADAPTERS
from transport import codec, json_wire, messages, openpi_msgpack
from transport.errors import BadRequest
from transport.messages import KEEP, build_request, client_guidance
from transport.zmq_requests import encode_request

IMAGE = np.zeros((4, 4, 3), np.uint8)
OBS = Observation({"base_0_rgb": IMAGE}, np.array([0.5], np.float32), 1.5)
LEFTOVER = np.arange(12, dtype=np.float64).reshape(6, 2) / 10
RTC = {"inference_delay": 2, "execute_horizon": 3}


def _zmq(options: dict, arrays: dict | None = None, kind: str = "infer") -> messages.Request:
    """A request decoded as the server decodes it: an observation, the prompt, `options`, `arrays`."""
    header = {"type": kind, "id": 1, "options": {"high_level_prompt": "go", **options}}
    all_arrays = {**messages.observation_arrays(OBS), **(arrays if arrays is not None else {})}
    return build_request(*codec.decode(codec.encode(header, all_arrays)), "peer")


def _zmq_bad(field: str, options: dict, arrays: dict | None = None, kind: str = "infer") -> str:
    with pytest.raises(BadRequest) as info:
        _zmq(options, arrays, kind)
    assert info.value.code == "bad_request" and field in info.value.message, info.value.message
    return info.value.message


def test_the_client_encoding_round_trips_into_the_guidance():
    guidance = ChunkGuidance(LEFTOVER, 2, 3, "zeros", 40.0)
    frames = encode_request("infer", 7, "arm", "go", None, OBS, KEEP, guidance, True)
    request = build_request(*codec.decode(frames), "peer")
    g = request.guidance
    assert (g.inference_delay, g.execute_horizon, g.schedule, g.max_guidance_weight) == (2, 3, "zeros", 40.0)
    np.testing.assert_array_equal(g.prev_actions, LEFTOVER.astype(np.float32))
    assert request.return_model_actions and request.observation.state.tolist() == [0.5]
    assert "prev_actions" not in request.observation.images


def test_schedule_and_weight_default_to_the_engines_and_nothing_means_no_guidance():
    g = _zmq(RTC, {"prev_actions": LEFTOVER}).guidance
    assert (g.schedule, g.max_guidance_weight) == (ChunkGuidance.schedule, ChunkGuidance.max_guidance_weight)
    plain = _zmq({})
    assert plain.guidance is None and not plain.return_model_actions
    # The model-space chunk may be asked for without guidance.
    assert _zmq({"return_model_actions": True}).return_model_actions


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int32, np.uint8])
def test_numeric_dtypes_are_accepted(dtype):
    assert _zmq(RTC, {"prev_actions": LEFTOVER.astype(dtype)}).guidance.prev_actions.dtype == dtype


@pytest.mark.parametrize(
    "prev",
    [
        np.zeros(6),  # 1-D
        np.zeros((2, 3, 2)),  # 3-D
        np.zeros((0, 2)),  # no rows
        np.zeros((2, 0)),  # no columns
        np.zeros((messages.MAX_CHUNK_STEPS + 1, 2)),
        np.zeros((2, messages.MAX_ACTION_DIM + 1)),
        np.zeros((2, 2), bool),
    ],
)
def test_a_leftover_of_the_wrong_shape_or_dtype_is_refused(prev):
    _zmq_bad("prev_actions", RTC, {"prev_actions": prev})


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf, 1e300])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_leftover_that_float32_cannot_hold_is_refused(value, dtype):
    if dtype == np.float32 and value == 1e300:
        value = np.inf  # float32 rounds it there anyway
    prev = LEFTOVER.astype(dtype).copy()
    prev[3, 1] = value
    assert "finite" in _zmq_bad("prev_actions", RTC, {"prev_actions": prev})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("inference_delay", -1),
        ("inference_delay", messages.MAX_CHUNK_STEPS + 1),
        ("inference_delay", 2.0),
        ("inference_delay", True),
        ("inference_delay", "2"),
        ("inference_delay", 2**64 - 1),
        ("execute_horizon", 0),
        ("execute_horizon", [3]),
        ("execute_horizon", None),
        ("rtc_schedule", "cosine"),
        ("rtc_schedule", 1),
        ("rtc_schedule", None),
        ("max_guidance_weight", -0.5),
        ("max_guidance_weight", float("nan")),
        ("max_guidance_weight", float("inf")),
        ("max_guidance_weight", 1e39),
        ("max_guidance_weight", "5"),
        ("max_guidance_weight", True),
        ("return_model_actions", 1),
        ("return_model_actions", "yes"),
    ],
)
def test_each_option_is_type_and_range_checked(field, value):
    _zmq_bad(field, {**RTC, field: value}, {"prev_actions": LEFTOVER})


@pytest.mark.parametrize("field", ["inference_delay", "execute_horizon"])
def test_delay_and_horizon_are_required_with_a_leftover(field):
    options = {k: v for k, v in RTC.items() if k != field}
    assert "required" in _zmq_bad(field, options, {"prev_actions": LEFTOVER})


@pytest.mark.parametrize("field", ["inference_delay", "execute_horizon", "rtc_schedule", "max_guidance_weight"])
def test_an_option_without_a_leftover_is_refused_not_ignored(field):
    value = {"rtc_schedule": "exp", "max_guidance_weight": 1.0}.get(field, 2)
    assert "needs prev_actions" in _zmq_bad(field, {field: value})


@pytest.mark.parametrize("kind", ["subtask", "refresh"])
def test_guidance_goes_with_infer_requests_only(kind):
    _zmq_bad("infer requests only", RTC, {"prev_actions": LEFTOVER}, kind=kind)
    _zmq_bad("infer requests only", {"return_model_actions": True}, kind=kind)


def test_a_leftover_needs_its_observation_in_the_same_request():
    header = {"type": "infer", "id": 1, "options": {"high_level_prompt": "go", **RTC}}
    with pytest.raises(BadRequest, match="needs the observation"):
        build_request(*codec.decode(codec.encode(header, {"prev_actions": LEFTOVER})), "peer")


def test_client_guidance_needs_its_pieces_together():
    assert client_guidance(None, None, None, None, None) is None
    with pytest.raises(ValueError, match="need prev_actions"):
        client_guidance(None, 2, None, None, None)
    with pytest.raises(ValueError, match="needs inference_delay"):
        client_guidance(LEFTOVER, None, 3, None, None)
    g = client_guidance(LEFTOVER, 2, 3, "linear", None)
    assert (g.schedule, g.max_guidance_weight) == ("linear", ChunkGuidance.max_guidance_weight)


# ----------------------------------------------------------------------------- JSON API


def _json(**fields) -> messages.Request:
    item = {"images": {"base_0_rgb": IMAGE.tolist()}, "high_level_prompt": "go", **fields}
    return json_wire.parse_request(json_wire.loads(json.dumps(item)), "@json/1")


def _json_bad(field: str, **fields) -> str:
    with pytest.raises(BadRequest) as info:
        _json(**fields)
    assert field in info.value.message, info.value.message
    return info.value.message


def test_json_fields_become_the_guidance():
    request = _json(prev_actions=LEFTOVER.tolist(), **RTC, rtc_schedule="ones", return_model_actions=True)
    g = request.guidance
    np.testing.assert_array_equal(g.prev_actions, LEFTOVER)
    assert (g.inference_delay, g.execute_horizon, g.schedule) == (2, 3, "ones") and request.return_model_actions
    assert _json().guidance is None and _json(prev_actions=None).guidance is None


@pytest.mark.parametrize(
    "prev",
    [
        [1.0, 2.0],  # not rows
        [],
        [[]],
        [[1.0, 2.0], [1.0]],  # ragged
        [[1.0, "2"]],
        [[1.0, None]],
        [[1.0, True]],
        [[1.0, 1e39]],  # beyond float32
        [[1.0, 10**400]],  # an integer float() cannot take
        [[[1.0]]],
        {"0": [1.0]},
        [[0.0] * (messages.MAX_ACTION_DIM + 1)],
    ],
)
def test_a_json_leftover_that_is_not_rows_of_finite_numbers_is_refused(prev):
    _json_bad("prev_actions", prev_actions=prev, **RTC)


def test_json_1e400_parses_as_infinity_and_is_refused():
    text = '{"images": {"base_0_rgb": [[[0, 0, 0]]]}, "high_level_prompt": "go", "inference_delay": 0, '
    text += '"execute_horizon": 1, "prev_actions": [[1.0, 1e400]]}'
    with pytest.raises(BadRequest, match=r"prev_actions\[0\]\[1\] must be a finite number"):
        json_wire.parse_request(json_wire.loads(text), "@json/1")


def test_a_json_batch_names_the_item():
    ok = {"images": {"base_0_rgb": IMAGE.tolist()}, "high_level_prompt": "go"}
    bad = {**ok, "prev_actions": [[1.0]], "inference_delay": -1, "execute_horizon": 1}
    with pytest.raises(BadRequest, match=r"batch\[1\]: inference_delay"):
        json_wire.parse_batch({"batch": [ok, bad]}, "@json/1", 8)


def test_json_replies_carry_model_actions_when_the_server_sent_them():
    actions, model = np.ones((3, 2), np.float32), np.zeros((3, 4), np.float32)
    out = json_wire.response({"actions": actions, "model_actions": model}, 1.0)
    assert np.asarray(out["model_actions"]).shape == (1, 3, 4)
    assert "model_actions" not in json_wire.response({"actions": actions}, 1.0)


# ----------------------------------------------------------------------------- openpi port


def test_openpi_keys_come_out_of_the_observation_as_plain_values():
    obs = openpi_msgpack.unpackb(
        openpi_msgpack.packb(
            {
                "observation/state": np.zeros(8),
                "prompt": "go",
                "prev_actions": LEFTOVER,
                "inference_delay": np.int64(2),
                "execute_horizon": np.int32(3),
                "max_guidance_weight": np.float32(8.0),
                "return_model_actions": np.bool_(True),
            }
        )
    )
    rest, options, prev = openpi_msgpack.pop_guidance(obs)
    assert set(rest) == {"observation/state", "prompt"}
    assert options == {
        "inference_delay": 2,
        "execute_horizon": 3,
        "max_guidance_weight": 8.0,
        "return_model_actions": True,
    }
    assert all(type(v) in (int, float, bool) for v in options.values())
    guidance, return_model_actions = messages.parse_guidance(options, prev)
    np.testing.assert_array_equal(guidance.prev_actions, LEFTOVER)
    assert return_model_actions and guidance.inference_delay == 2


@pytest.mark.parametrize("prev", [[[1.0, 2.0]], "x", np.float64(1.0)])
def test_an_openpi_leftover_must_be_an_array(prev):
    with pytest.raises(BadRequest, match="prev_actions must be an ndarray"):
        openpi_msgpack.pop_guidance({"prev_actions": prev, **RTC})


def test_openpi_options_are_checked_like_any_wires():
    _, options, prev = openpi_msgpack.pop_guidance({"prev_actions": LEFTOVER, "inference_delay": np.float64(2.5)})
    with pytest.raises(BadRequest, match="inference_delay"):
        messages.parse_guidance(options, prev)


@pytest.mark.parametrize("layout", sorted(ADAPTERS))
def test_each_openpi_layout_takes_its_own_actions_back(layout):
    adapter = ADAPTERS[layout].for_model(6)  # a pass-through layout takes the model's width
    actions = np.random.default_rng(0).uniform(-1, 1, (6, adapter.action_dim))
    np.testing.assert_allclose(adapter.from_model(adapter.actions_to_model(actions)), actions, atol=1e-12)
