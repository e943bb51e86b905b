"""The JSON API's parsing: bounded, typed errors naming the field, exact conversions."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from policy.request import Options
from transport import json_wire, messages
from transport.errors import ProtocolError, TransportError
from transport.messages import INFER, KEEP

IMAGE = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)


def _request(**fields) -> dict:
    return {"images": {"base_0_rgb": IMAGE.tolist()}, "high_level_prompt": "pick up the pen", **fields}


def _error(message: str | bytes, max_bytes: int | None = None) -> TransportError:
    with pytest.raises(TransportError) as info:
        payload = json_wire.loads(message, max_bytes)
        if isinstance(payload, dict) and "batch" in payload:
            json_wire.parse_batch(payload, "ws-1", 4)
        else:
            json_wire.parse_request(payload, "ws-1")
    return info.value


def test_a_request_parses_to_the_envelope_with_exact_values():
    text = json.dumps(_request(state=[0.5, -2, 1e-3], temperature=0, seed=7, subtask_refresh_interval=1.5))
    request = json_wire.parse_request(json_wire.loads(text), "ws-1")
    assert (request.type, request.id, request.robot, request.prompt) == (INFER, None, "ws-1", "pick up the pen")
    assert request.options == Options(temperature=0.0, seed=7) and request.refresh_interval == 1.5
    image = request.observation.images["base_0_rgb"]
    assert image.dtype == np.uint8 and image.shape == (4, 5, 3)
    np.testing.assert_array_equal(image, IMAGE)
    assert request.observation.state.dtype == np.float32
    np.testing.assert_array_equal(request.observation.state, np.array([0.5, -2, 1e-3], np.float32))
    assert json_wire.parse_request(_request(), "k").refresh_interval is KEEP
    assert json_wire.parse_request(_request(subtask_refresh_interval=None), "k").refresh_interval is None


def test_json_nested_100k_deep_is_invalid_json_on_the_loop_and_in_a_thread():
    # Issue 9: this closed the connection with 1011 (a RecursionError) instead of a typed error.
    text = "[" * 100_000 + "]" * 100_000
    assert _error(text).code == "invalid_json"
    with pytest.raises(ProtocolError, match="nest too deeply"):
        asyncio.run(asyncio.to_thread(json_wire.loads, text))
    deep = '{"a":' * 100_000 + "1" + "}" * 100_000
    assert _error(deep).code == "invalid_json"


def test_a_value_nested_where_a_scalar_belongs_is_bad_request():
    deep = "[" * 900 + "1" + "]" * 900  # within the parser's limit: it parses, then its field refuses it
    error = _error(json.dumps(_request(temperature=0)).replace('"temperature": 0', f'"temperature": {deep}'))
    assert error.code == "bad_request" and error.message == "temperature must be a number in 0..3.403e+38, got a list"
    error = _error(json.dumps(_request()).replace(json.dumps(IMAGE.tolist()), "[[[" + deep + ",0,0]]]"))
    assert error.code == "bad_request" and "base_0_rgb" in error.message


def test_a_number_of_5000_digits_is_invalid_json():
    # Issue 9: Python's int-digit limit raised ValueError inside json.loads: 1011 and a closed connection.
    error = _error(json.dumps(_request(seed=0)).replace('"seed": 0', '"seed": ' + "9" * 5000))
    assert error.code == "invalid_json" and "more than 4300 digits" in error.message
    # 4000 digits parse, then the field refuses the value without printing it.
    error = _error(json.dumps(_request(seed=0)).replace('"seed": 0', '"seed": ' + "9" * 4000))
    assert error.code == "bad_request" and error.message.startswith("seed must be") and len(error.message) < 200


@pytest.mark.parametrize(
    ("field", "text"),
    [
        ("temperature", '"temperature": 1e400'),
        ("subtask_refresh_interval", '"subtask_refresh_interval": 1e400'),
        ("subtask_refresh_interval", '"subtask_refresh_interval": -1e400'),
        ("state[1]", '"state": [0, 1e400]'),
        ("state[0]", '"state": [-1e400]'),
        ("state[0]", '"state": [1' + "0" * 400 + "]"),  # an integer float() overflows on
        ("state", '"state": [1e39]'),  # finite, but inf as float32
        ("temperature", '"temperature": 1' + "0" * 400 + ".5"),  # a float literal of 400 digits: inf
        ("max_decoding_steps", '"max_decoding_steps": 1' + "0" * 400),
    ],
)
def test_out_of_range_numbers_name_their_field(field, text):
    # Issue 9: temperature, state or interval of 1e400 answered `internal` (OverflowError).
    message = json.dumps(_request(high_level_prompt="go")).replace(
        '"high_level_prompt": "go"', text + ', "high_level_prompt": "go"'
    )
    error = _error(message)
    assert error.code == "bad_request" and error.message.startswith(field), error.message


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_json_number_literals_are_invalid_json(literal):
    error = _error(
        json.dumps(_request()).replace('"high_level_prompt"', f'"temperature": {literal}, "high_level_prompt"')
    )
    assert error.code == "invalid_json" and literal in error.message


@pytest.mark.parametrize(
    ("fragment", "field"),
    [
        ('"high_level_prompt": "pick \\ud800 up"', "high_level_prompt"),
        ('"high_level_prompt": "\\udfff"', "high_level_prompt"),
        ('"low_level_prompt": "a\\ud83d", "high_level_prompt": "go"', "low_level_prompt"),
    ],
)
def test_lone_surrogates_are_bad_request(fragment, field):
    # Issue 9: a lone surrogate in the prompt answered `internal` (UnicodeEncodeError in the tokenizer).
    error = _error(json.dumps(_request()).replace('"high_level_prompt": "pick up the pen"', fragment))
    assert error.code == "bad_request" and error.message.startswith(f"{field} is not valid Unicode")


def test_a_lone_surrogate_in_a_camera_name_is_bad_request():
    error = _error(json.dumps(_request()).replace('"base_0_rgb"', '"cam\\ud800"'))
    assert error.code == "bad_request" and "camera name" in error.message


def test_the_size_is_checked_before_parsing():
    assert _error("{" * 2000, max_bytes=1000).code == "oversize"
    assert _error(b"{}").code == "bad_request"  # a binary frame


@pytest.mark.parametrize(
    ("image", "words"),
    [
        ([[[0, 0, 256]]], "outside 0..255"),
        ([[[-1, 0, 0]]], "outside 0..255"),
        ([[[0.5, 0, 0]]], "integers"),
        ([[[True, False, True]]], "integers"),
        ([[["1", 0, 0]]], "integers"),
        ([[[None, 0, 0]]], "integers"),
        ([[[2**70, 0, 0]]], "integers"),
        ([[[0, 0, 0]], [[0, 0]]], "ragged"),
        ([[[0, 0, 0]], [[0, 0, 0], [0, 0, 0]]], "ragged"),
        ([[[[0], 0, 0]]], "ragged"),
        ([[[0, 0, 0, 0]]], "H x W x 3"),
        ([[0, 0, 0]], "H x W x 3"),
        ([], "H x W x 3"),
        ([[]], "H x W x 3"),
        ({"0": 1}, "H x W x 3"),
        ([[[0, 0, 0]]] * (messages.MAX_IMAGE_SIDE + 1), "H x W x 3"),
        ([[[0, 0, 0]] * (messages.MAX_IMAGE_SIDE + 1)], "H x W x 3"),
    ],
)
def test_images_are_h_w_3_integers_0_to_255(image, words):
    error = _error(json.dumps(_request(images={"base_0_rgb": image})))
    assert error.code == "bad_request" and "base_0_rgb" in error.message and words in error.message, error.message


def test_request_fields():
    for request, words in [
        ([], "a request must be a JSON object, got a list"),
        ({"images": {"a": IMAGE.tolist()}}, "high_level_prompt is required"),
        (_request(high_level_prompt=""), "high_level_prompt is required"),
        (_request(images={}), "images is required"),
        (_request(images=[IMAGE.tolist()]), "images is required"),
        (_request(images={f"c{i}": [[[0, 0, 0]]] for i in range(messages.MAX_CAMERAS + 1)}), "cameras"),
        (_request(state=[]), "state must be a list of 1..256 numbers"),
        (_request(state=[True]), "state[0] must be a finite number, got True"),
        (_request(state="1,2"), "state must be a list"),
        (_request(robot="x"), "unknown option 'robot'"),
    ]:
        error = _error(json.dumps(request))
        assert error.code == "bad_request" and words in error.message, (words, error.message)


def test_a_batch_checks_every_item_before_converting_any_image():
    bad_image = _request(images={"base_0_rgb": [[[0, 0, 300]]]})  # found only by conversion
    bad_option = _request(temperature=-1)  # found by the cheap checks
    error = _error(json.dumps({"batch": [bad_image, bad_option]}))
    assert error.message.startswith("batch[1]: temperature")
    error = _error(json.dumps({"batch": [_request(), bad_image]}))
    assert error.message.startswith("batch[1]: image 'base_0_rgb' has values outside 0..255")


def test_batch_shape():
    requests = json_wire.parse_batch({"batch": [_request(), _request(seed=1)]}, "ws-2", 2)
    assert [r.options.seed for r in requests] == [None, 1] and {r.robot for r in requests} == {"ws-2"}
    assert _error(json.dumps({"batch": []})).message == "batch must be a non-empty list of requests"
    assert _error(json.dumps({"batch": [_request()] * 5})).message == "batch has 5 requests, more than 4"
    assert "only" in _error(json.dumps({"batch": [_request()], "x": 1})).message


def test_replies():
    data = {"subtask": "go", "subtask_tokens": [1, 2], "timing": {"total_ms": 1.0}, "subtask_refresh_enabled": True}
    reply = json_wire.response(data, {"actions": np.ones((2, 3), np.float32)}, 4.0)
    assert reply == {
        "status": "success",
        "actions": [[[1.0] * 3] * 2],
        "subtask": "go",
        "subtask_tokens": [1, 2],
        "state": None,
        "timing": {"total_ms": 1.0},
        "server_timing": {"total_ms": 4.0},
        "subtask_refresh_enabled": True,
        "subtask_refresh_interval": None,
    }
    published = {"type": "subtask_refresh", "subtask": "s", "subtask_tokens": [3], "refresh_count": 2, "timestamp": 5.0}
    assert json_wire.refresh_message({**published, "seq": 9, "epoch": 1.0, "robot": "@ws-1"}) == published
    assert json_wire.error("oversize", "too big") == {
        "status": "error",
        "error": {"code": "oversize", "message": "too big"},
    }
