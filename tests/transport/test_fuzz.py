"""Hostile input, generated: random and mutated ZMQ frames, openpi msgpack and JSON text.

Every input must give either a valid value or a `TransportError` with one of its decoder's codes
(any other exception fails the test, as would a crash), and error messages stay short whatever the
input's size. Runs are derandomized, so CI sees the same inputs every time; each test is bounded
by its example count.
"""

from __future__ import annotations

import json

import msgpack
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from openpi_client import msgpack_numpy as openpi

from tests.support.strategies import (
    ARRAY_NAMES,
    DESCRIPTOR_FIELDS,
    FRAMES,
    HEADER_FIELDS,
    HEADERS,
    TEXT,
    dumps,
    json_keys,
    json_values,
    msgpack_scalars,
    msgpack_trees,
    msgpack_values,
    mutate_bytes,
    mutate_frames,
    mutate_text,
    nd,
    openpi_arrays,
    packb,
    valid_json_request,
)
from transport import codec, json_wire, messages, openpi_msgpack
from transport.errors import TransportError
from transport.messages import REPLY_TYPE, Request

FUZZ = settings(
    max_examples=250,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
ZMQ_CODES = {"bad_message", "bad_header", "bad_version", "bad_frames", "bad_dtype", "unknown_type", "bad_request"}
OPENPI_CODES = {"bad_message", "bad_array", "bad_dtype"}
JSON_CODES = {"invalid_json", "bad_request", "oversize"}
MAX_ERROR_CHARS = 500

ALLOWED = [np.dtype(s) for s in sorted(codec.DTYPES)]
ARRAYS = hnp.arrays(st.sampled_from(ALLOWED), hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
IMAGES = hnp.arrays(np.uint8, st.tuples(st.integers(1, 4), st.integers(1, 4), st.just(3)))
STATES = hnp.arrays(st.sampled_from([np.float32, np.float64, np.int32]), st.integers(1, 4))


MUTANTS = 8  # mutated variants checked per generated input (cheap: no hypothesis draws each)


# ---- ZMQ frames -> codec.decode -> messages.build_request ----

OBSERVATIONS = st.dictionaries(ARRAY_NAMES, IMAGES | STATES | ARRAYS, min_size=1, max_size=3) | st.just({})
DESCRIPTOR_EDITS = st.fixed_dictionaries({}, optional=DESCRIPTOR_FIELDS)


@st.composite
def zmq_messages(draw) -> list[bytes]:
    """A request encoded by `codec.encode`, then perhaps changed: a header field set to junk or a
    descriptor field replaced."""
    frames = [bytes(f) for f in codec.encode(draw(HEADERS), draw(OBSERVATIONS))]
    header = msgpack.unpackb(frames[0], strict_map_key=False)
    how = draw(
        st.sampled_from(["none", "field", "descriptor", "descriptor"] if header["arrays"] else ["none", "field"])
    )
    if how == "field":
        header[draw(st.sampled_from(HEADER_FIELDS))] = draw(msgpack_values)
        frames[0] = packb(header)
    elif how == "descriptor":
        i = draw(st.integers(0, len(header["arrays"]) - 1))
        edited = {**header["arrays"][i], **draw(DESCRIPTOR_EDITS)}
        header["arrays"][i] = draw(msgpack_values) if draw(st.booleans()) else edited
        frames[0] = packb(header)
    return frames


def _build(frames: list[bytes]) -> Request | None:
    assert codec.is_request_id(codec.request_id(frames))
    try:
        header, arrays = codec.decode(frames)
        request = messages.build_request(header, arrays, "peer")
    except TransportError as e:
        assert e.code in ZMQ_CODES and len(e.message) <= MAX_ERROR_CHARS, (e.code, e.message)
        return None
    assert request.type in REPLY_TYPE and 0 < len(request.robot) <= messages.MAX_ROBOT_CHARS
    assert not request.robot.startswith(messages.RESERVED_PREFIX)
    _assert_options(request)
    obs = request.observation
    if obs is not None:
        for image in obs.images.values():
            assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and not image.flags.writeable
        if obs.state is not None:
            assert obs.state.ndim == 1 and np.all(np.isfinite(obs.state.astype(np.float64)))
        assert obs.timestamp is None or np.isfinite(obs.timestamp)
    return request


def _assert_options(request: Request) -> None:
    o = request.options
    assert isinstance(o.generate_subtask, bool) and np.isfinite(o.temperature) and o.temperature >= 0
    assert isinstance(o.max_decoding_steps, int) and (o.seed is None or 0 <= o.seed < 2**64)
    for text in (request.prompt, o.low_level_prompt):
        assert text is None or len(text.encode("utf-8")) <= messages.MAX_PROMPT_BYTES
    interval = request.refresh_interval
    assert interval is messages.KEEP or interval is None or 0 < interval <= messages.MAX_REFRESH_INTERVAL_S


@FUZZ
@given(zmq_messages(), st.randoms(use_true_random=False))
def test_zmq_frames_give_a_request_or_a_typed_error(frames, rnd):
    _build(frames)
    for _ in range(MUTANTS):
        _build(mutate_frames(frames, rnd))


@FUZZ
@given(st.lists(FRAMES, max_size=4))
def test_random_zmq_frames_give_a_request_or_a_typed_error(frames):
    _build(frames)


VALID_OPTIONS = st.builds(
    messages.Options,
    generate_subtask=st.booleans(),
    low_level_prompt=st.none() | TEXT,
    max_decoding_steps=st.integers(1, 64),
    temperature=st.floats(0, 10),
    seed=st.none() | st.integers(0, 2**32 - 1),
)


@settings(FUZZ, max_examples=100)
@given(
    prompt=st.none() | TEXT,
    options=VALID_OPTIONS,
    interval=st.sampled_from([messages.KEEP, None]) | st.floats(0.01, 100),
    images=st.dictionaries(st.sampled_from(["base_0_rgb", "left_wrist_0_rgb"]), IMAGES, max_size=2),
    state=st.none() | hnp.arrays(np.float32, st.integers(1, 8), elements=st.floats(-1e6, 1e6, width=32)),
)
def test_valid_zmq_requests_arrive_unchanged(prompt, options, interval, images, state):
    obs = messages.Observation(images, state, 1.5)
    header = {"type": "infer", "id": 1, "robot": "arm", "ts": 1.5}
    header["options"] = messages.options_to_wire(prompt, options, interval)
    request = _build(codec.encode(header, messages.observation_arrays(obs)))
    assert request is not None
    assert (request.prompt, request.options, request.refresh_interval) == (prompt, options, interval)
    if images or state is not None:
        assert request.observation.images.keys() == images.keys()
        for name, image in images.items():
            np.testing.assert_array_equal(request.observation.images[name], image)
        np.testing.assert_array_equal(request.observation.state, state)


# ---- openpi msgpack -> openpi_msgpack.unpackb ----


OPENPI_TREES = msgpack_trees(msgpack_scalars | openpi_arrays() | ARRAYS.map(nd))


@st.composite
def openpi_messages(draw) -> bytes:
    how = draw(st.sampled_from(["tree", "observation", "nesting"]))
    if how == "tree":
        return packb(draw(OPENPI_TREES))
    if how == "nesting":
        return b"\x91" * draw(st.integers(0, 3000)) + draw(st.binary(max_size=4))
    return openpi.packb({"observation/image": draw(IMAGES), "observation/state": draw(STATES), "prompt": draw(TEXT)})


def _assert_openpi_value(value) -> None:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, np.ndarray | np.generic):
            assert item.dtype.str in codec.DTYPES
            assert not isinstance(item, np.ndarray) or not item.flags.writeable
        else:
            assert item is None or isinstance(item, bool | int | float | str | bytes), type(item)


def _unpack_openpi(data: bytes) -> None:
    try:
        value = openpi_msgpack.unpackb(data)
    except TransportError as e:
        assert e.code in OPENPI_CODES and len(e.message) <= MAX_ERROR_CHARS, (e.code, e.message)
        return
    _assert_openpi_value(value)


@FUZZ
@given(openpi_messages(), st.randoms(use_true_random=False))
def test_openpi_messages_give_a_value_or_a_typed_error(data, rnd):
    _unpack_openpi(data)
    for _ in range(MUTANTS):
        _unpack_openpi(mutate_bytes(data, rnd))


# ---- JSON text -> json_wire ----

JSON_IMAGES = IMAGES.map(lambda a: a.tolist()) | st.lists(
    st.lists(st.lists(json_values, max_size=4), max_size=3), max_size=3
)
JSON_REQUESTS = st.fixed_dictionaries(
    {},
    optional={
        "images": st.dictionaries(
            st.sampled_from(["base_0_rgb", "right_wrist_0_rgb"]) | json_keys, JSON_IMAGES, max_size=2
        )
        | json_values,
        "high_level_prompt": st.text() | json_values,
        "low_level_prompt": st.text() | json_values,
        "state": st.lists(st.floats() | st.integers(), max_size=4) | json_values,
        "temperature": st.floats() | st.integers() | json_values,
        "max_decoding_steps": st.integers() | json_values,
        "seed": st.integers() | json_values,
        "generate_subtask": st.booleans() | json_values,
        "subtask_refresh_interval": st.floats() | st.none() | json_values,
    },
)
VALID_REQUEST = json.dumps(valid_json_request())


@st.composite
def json_messages(draw) -> str:
    how = draw(st.sampled_from(["request", "batch", "junk", "valid"]))
    if how == "request":
        return dumps(draw(JSON_REQUESTS))
    if how == "batch":
        return dumps({"batch": draw(st.lists(JSON_REQUESTS | st.just(valid_json_request()), max_size=4))})
    if how == "junk":
        return dumps(draw(json_values))
    return VALID_REQUEST


def _parse_json(text: str) -> list[Request] | None:
    try:
        payload = json_wire.loads(text, max_bytes=1 << 20)
        if isinstance(payload, dict) and "batch" in payload:
            return json_wire.parse_batch(payload, "ws-1", 4)
        return [json_wire.parse_request(payload, "ws-1")]
    except TransportError as e:
        assert e.code in JSON_CODES and len(e.message) <= MAX_ERROR_CHARS, (e.code, e.message)
        return None


def _check_json(text: str) -> None:
    for request in _parse_json(text) or []:
        assert request.type == messages.INFER and request.robot == "ws-1" and request.prompt
        _assert_options(request)
        for image in request.observation.images.values():
            assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        state = request.observation.state
        assert state is None or (state.dtype == np.float32 and np.all(np.isfinite(state)))


@FUZZ
@given(json_messages(), st.randoms(use_true_random=False))
def test_json_messages_give_requests_or_a_typed_error(text, rnd):
    _check_json(text)
    for _ in range(MUTANTS):
        _check_json(mutate_text(text, rnd))


def test_the_generators_reach_valid_requests():
    """The fuzzers are not vacuous: the unmutated messages they start from are served."""
    assert _build(codec.encode({"type": "infer", "options": {"high_level_prompt": "go"}}, {})) is not None
    assert _parse_json(VALID_REQUEST) is not None
    assert _parse_json(json.dumps({"batch": [json.loads(VALID_REQUEST)] * 2})) is not None
