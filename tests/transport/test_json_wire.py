"""The JSON API's parsing: bounded, typed errors naming the field, exact conversions."""

from __future__ import annotations

import asyncio
import json
import tracemalloc

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
    deep = '{"a":' * 5_000 + "1" + "}" * 5_000  # within the object count, past the recursion limit
    assert _error(deep).code == "invalid_json"
    deeper = '{"a":' * 100_000 + "1" + "}" * 100_000  # more objects than any message holds: counted first
    assert _error(deeper).code == "bad_request" and "objects" in _error(deeper).message


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
    reply = json_wire.response({**data, "actions": np.ones((2, 3), np.float32)}, 4.0)
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


def _flood(unit: str, chars: int) -> str:
    return "[" + (unit * (chars // len(unit))).rstrip(", ") + "]"


@pytest.mark.parametrize(
    ("unit", "what"),
    [("{},", "objects ('{')"), ('"ab",', "strings ('\"')"), ("[],", "lists ('[')"), ("[0],  ", "lists ('[')")],
)
def test_floods_of_empty_objects_strings_or_small_lists_are_refused_before_parsing(monkeypatch, unit, what):
    # The adversary's 100 MB of `{},` cost a gateway 2.6 GB: 25 bytes per byte, each `{}` a dict.
    def never(*args, **kwargs):
        raise AssertionError("json.loads ran: the flood was not counted first")

    monkeypatch.setattr(json_wire.json, "loads", never)
    error = _error(_flood(unit, 10_000_000))
    assert error.code == "bad_request" and error.message.startswith("the message opens ") and what in error.message


def _densest_request(i: int, char: str) -> dict:
    """A request the server accepts that holds as many `char` per character as any can: its strings
    full of it, images one pixel wide (2 lists in 10 characters), 1024 leftover rows."""
    cameras = {f"{i}{c}" + char * (messages.MAX_CAMERA_CHARS - 2): [[[0, 0, 0]]] * 50 for c in range(8)}
    prompt = char * messages.MAX_PROMPT_BYTES
    return _request(
        images=cameras, high_level_prompt=prompt, low_level_prompt=prompt, state=[0.0],
        prev_actions=[[0.0]] * messages.MAX_CHUNK_STEPS, inference_delay=1, execute_horizon=1, rtc_schedule="exp",
    )  # fmt: skip


@pytest.mark.parametrize("max_batch", [1, 8])
@pytest.mark.parametrize("char", ["{", '"', "["])
def test_the_densest_requests_a_server_accepts_pass_the_counts(max_batch, char):
    def batch(n: int) -> str:
        return json.dumps({"batch": [_densest_request(i, char) for i in range(n)]}, separators=(",", ":"))

    limits = json_wire.JsonLimits(max_batch)
    requests = json_wire.parse_batch(json_wire.loads(batch(max_batch), limits=limits), "ws-1", max_batch)
    assert len(requests) == max_batch and len(requests[0].observation.images) == 8
    if char != "[":  # the limits are tight: one such request more than the batch limit is counted out
        with pytest.raises(TransportError, match="more than the"):
            json_wire.loads(batch(max_batch + 1), limits=limits)


def test_what_json_loads_may_build_after_the_counts_is_what_an_image_of_that_length_costs():
    # The worst shapes that pass the counts (lists of 3 as dense as pixels, of floats, negative
    # integers, which Python does not cache) cost about what a legitimate image of nested lists does.
    chars = 3_000_000
    image = json.dumps(np.zeros((chars // 8000, 1000, 3), int).tolist(), separators=(",", ":"))
    shapes = {"image": image, "float pixels": _flood("[1e5,1e5,1e5],", chars), "negative ints": _flood("-9,", chars)}
    per_char = {}
    for name, text in shapes.items():
        tracemalloc.start()
        json_wire.loads(text)
        per_char[name] = tracemalloc.get_traced_memory()[1] / len(text)
        tracemalloc.stop()
    assert max(per_char.values()) < 1.5 * per_char["image"], per_char


def test_replies_with_nan_or_infinity_are_refused_by_the_encoder():
    assert json_wire.dumps({"actions": [[1.5]]}) == '{"actions": [[1.5]]}'
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError):
            json_wire.dumps({"status": "success", "actions": [[[0.0, bad]]]})
