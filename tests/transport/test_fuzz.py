"""Hostile input, generated: random and mutated ZMQ frames, openpi msgpack and JSON text.

Every input must give either a valid value or a `TransportError` with one of its decoder's codes
(any other exception fails the test, as would a crash), and error messages stay short whatever the
input's size. Runs are derandomized, so CI sees the same inputs every time; each test is bounded
by its example count.
"""

from __future__ import annotations

import json
import random

import msgpack
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from openpi_client import msgpack_numpy as openpi

from transport import codec, json_wire, messages, openpi_msgpack
from transport.errors import TransportError
from transport.messages import REPLY_TYPE, WIRE_OPTIONS, Request

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

# msgpack can carry these (no lone surrogates: its UTF-8 encoder refuses them).
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=10)
INTS = st.integers(-(2**63), 2**64 - 1)
SCALARS = st.none() | st.booleans() | INTS | st.floats() | TEXT | st.binary(max_size=10)
CONTAINERS = st.lists(SCALARS, max_size=2) | st.dictionaries(TEXT, SCALARS, max_size=2)  # unhashable, as a dtype
JUNK = st.recursive(SCALARS, lambda c: st.lists(c, max_size=3) | st.dictionaries(TEXT, c, max_size=3), max_leaves=8)
DTYPE_STRINGS = st.sampled_from(
    [*sorted(codec.DTYPES), "T", "|O", "<U4", "|S2", ">f4", "<c8", "|V4", "f4", "<M8[s]", "(2,)<f4", "float32"]
)
SHAPES = (
    st.lists(st.integers(0, 4), max_size=4)
    | st.lists(st.integers(-2, 2**40), max_size=9)
    | st.lists(st.sampled_from([0, 2**31 - 1, 2**31]), min_size=7, max_size=9)
    | JUNK
)
ALLOWED = [np.dtype(s) for s in sorted(codec.DTYPES)]
ARRAYS = hnp.arrays(st.sampled_from(ALLOWED), hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
IMAGES = hnp.arrays(np.uint8, st.tuples(st.integers(1, 4), st.integers(1, 4), st.just(3)))
STATES = hnp.arrays(st.sampled_from([np.float32, np.float64, np.int32]), st.integers(1, 4))


MUTANTS = 8  # mutated variants checked per generated input (cheap: no hypothesis draws each)


def _mutate_bytes(data: bytes, rnd: random.Random) -> bytes:
    """One to four byte flips, insertions, deletions or a truncation."""
    out = bytearray(data)
    for _ in range(rnd.randint(1, 4)):
        at = rnd.randint(0, len(out))
        op = rnd.randrange(4)
        if op == 0 and at < len(out):
            out[at] = rnd.randrange(256)
        elif op == 1:
            out.insert(at, rnd.randrange(256))
        elif op == 2:
            del out[at : at + rnd.randint(1, 4)]
        elif op == 3:
            del out[at:]
    return bytes(out)


def _mutate_frames(frames: list[bytes], rnd: random.Random) -> list[bytes]:
    """Bytes of one frame edited, or frames dropped, repeated or added."""
    frames = list(frames)
    if rnd.random() < 0.7 and frames:
        i = rnd.randrange(len(frames))
        frames[i] = _mutate_bytes(frames[i], rnd)
    elif rnd.random() < 0.5 and frames:
        del frames[rnd.randrange(len(frames))]
    else:
        frames.insert(
            rnd.randint(0, len(frames)), rnd.choice([*frames, b"", bytes(rnd.randrange(256) for _ in range(8))])
        )
    return frames


# ---- ZMQ frames -> codec.decode -> messages.build_request ----

OPTION_VALUES = st.floats() | INTS | st.booleans() | st.none() | TEXT | JUNK
HEADERS = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(sorted(REPLY_TYPE)) | CONTAINERS | JUNK,
        "id": INTS | TEXT | JUNK,
        "robot": st.sampled_from(["arm", "@gw", ""]) | TEXT | JUNK,
        "ts": st.floats() | INTS | JUNK,
        "options": st.dictionaries(st.sampled_from(WIRE_OPTIONS) | TEXT, OPTION_VALUES, max_size=4) | JUNK,
    },
)
ARRAY_NAMES = st.sampled_from(["image/base_0_rgb", "image/left_wrist_0_rgb", "state", "image/", "actions"]) | TEXT
OBSERVATIONS = st.dictionaries(ARRAY_NAMES, IMAGES | STATES | ARRAYS, min_size=1, max_size=3) | st.just({})
DESCRIPTOR_EDITS = st.fixed_dictionaries(
    {}, optional={"name": ARRAY_NAMES | JUNK, "dtype": DTYPE_STRINGS | CONTAINERS | JUNK, "shape": SHAPES | CONTAINERS}
)


@st.composite
def zmq_messages(draw) -> list[bytes]:
    """A request encoded by `codec.encode`, then perhaps changed: a header field set to junk or a
    descriptor field replaced."""
    frames = [bytes(f) for f in codec.encode(draw(HEADERS), draw(OBSERVATIONS))]
    header = msgpack.unpackb(frames[0])
    how = draw(
        st.sampled_from(["none", "field", "descriptor", "descriptor"] if header["arrays"] else ["none", "field"])
    )
    if how == "field":
        header[draw(st.sampled_from(["v", "arrays", "type", "id", "robot", "ts", "options"]))] = draw(JUNK)
        frames[0] = msgpack.packb(header, use_bin_type=True)
    elif how == "descriptor":
        i = draw(st.integers(0, len(header["arrays"]) - 1))
        header["arrays"][i] = draw(JUNK) if draw(st.booleans()) else {**header["arrays"][i], **draw(DESCRIPTOR_EDITS)}
        frames[0] = msgpack.packb(header, use_bin_type=True)
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
        _build(_mutate_frames(frames, rnd))


@FUZZ
@given(st.lists(st.binary(max_size=40) | JUNK.map(lambda v: msgpack.packb(v, use_bin_type=True)), max_size=4))
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


@st.composite
def sized_ndarrays(draw) -> dict:
    """An `__ndarray__` map with data of exactly the described size, for any dtype string (`T`
    included: its data is then (pointer, length) pairs of random bytes)."""
    dtype = draw(DTYPE_STRINGS)
    shape = draw(st.lists(st.integers(0, 3), max_size=3))
    try:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    except TypeError:
        nbytes = 8
    return {
        b"__ndarray__": True,
        b"data": draw(st.binary(min_size=nbytes, max_size=nbytes)),
        b"dtype": dtype,
        b"shape": shape,
    }


CRAFTED_ARRAYS = st.fixed_dictionaries(
    {
        b"__ndarray__": st.just(True),
        b"data": st.binary(max_size=32) | JUNK,
        b"dtype": DTYPE_STRINGS | JUNK,
        b"shape": SHAPES,
    }
)
CRAFTED_SCALARS = st.fixed_dictionaries(
    {b"__npgeneric__": st.just(True), b"data": SCALARS | JUNK, b"dtype": DTYPE_STRINGS | JUNK}
)
OPENPI_LEAVES = SCALARS | CRAFTED_ARRAYS | CRAFTED_SCALARS | sized_ndarrays() | ARRAYS.map(openpi.pack_array)
OPENPI_TREES = st.recursive(
    OPENPI_LEAVES,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(TEXT | st.binary(max_size=4) | INTS, c, max_size=3),
    max_leaves=8,
)


@st.composite
def openpi_messages(draw) -> bytes:
    how = draw(st.sampled_from(["tree", "observation", "nesting"]))
    if how == "tree":
        return msgpack.packb(draw(OPENPI_TREES), use_bin_type=True)
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
        _unpack_openpi(_mutate_bytes(data, rnd))


# ---- JSON text -> json_wire ----

JSON_TEXT = st.text(max_size=10)  # lone surrogates included: json.dumps escapes them as \udXXX
JSON_JUNK = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | JSON_TEXT,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(JSON_TEXT, c, max_size=3),
    max_leaves=8,
)
JSON_IMAGES = IMAGES.map(lambda a: a.tolist()) | st.lists(
    st.lists(st.lists(JSON_JUNK, max_size=4), max_size=3), max_size=3
)
JSON_REQUESTS = st.fixed_dictionaries(
    {},
    optional={
        "images": st.dictionaries(
            st.sampled_from(["base_0_rgb", "right_wrist_0_rgb"]) | JSON_TEXT, JSON_IMAGES, max_size=2
        )
        | JSON_JUNK,
        "high_level_prompt": JSON_TEXT | JSON_JUNK,
        "low_level_prompt": JSON_TEXT | JSON_JUNK,
        "state": st.lists(st.floats() | st.integers(), max_size=4) | JSON_JUNK,
        "temperature": st.floats() | st.integers() | JSON_JUNK,
        "max_decoding_steps": st.integers() | JSON_JUNK,
        "seed": st.integers() | JSON_JUNK,
        "generate_subtask": st.booleans() | JSON_JUNK,
        "subtask_refresh_interval": st.floats() | st.none() | JSON_JUNK,
    },
)
HOSTILE = [
    "1e400",
    "-1e400",
    "9" * 5000,
    '"\\ud800"',
    "\\udfff",
    "[" * 3000,
    '{"a":' * 3000,
    "NaN",
    "-Infinity",
    "null",
]
MUTATION_CHARS = '[]{},:"0123456789.-eE \\u'

VALID_REQUEST = json.dumps(
    {"images": {"base_0_rgb": [[[1, 2, 3], [4, 5, 6]]]}, "high_level_prompt": "go", "state": [0.5], "temperature": 0}
)


@st.composite
def json_messages(draw) -> str:
    how = draw(st.sampled_from(["request", "batch", "junk", "valid"]))
    if how == "request":
        return json.dumps(draw(JSON_REQUESTS))
    if how == "batch":
        return json.dumps({"batch": draw(st.lists(JSON_REQUESTS | st.just(json.loads(VALID_REQUEST)), max_size=4))})
    if how == "junk":
        return json.dumps(draw(JSON_JUNK))
    return VALID_REQUEST


def _mutate_text(text: str, rnd: random.Random) -> str:
    """One to three spliced-in JSON fragments, hostile values or cuts."""
    for _ in range(rnd.randint(1, 3)):
        at = rnd.randint(0, len(text))
        insert = rnd.choice([rnd.choice(HOSTILE), "".join(rnd.choices(MUTATION_CHARS, k=rnd.randint(0, 4)))])
        text = text[:at] + insert + text[at + rnd.randint(0, 3) :]
    return text


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
        _check_json(_mutate_text(text, rnd))


def test_the_generators_reach_valid_requests():
    """The fuzzers are not vacuous: the unmutated messages they start from are served."""
    assert _build(codec.encode({"type": "infer", "options": {"high_level_prompt": "go"}}, {})) is not None
    assert _parse_json(VALID_REQUEST) is not None
    assert _parse_json(json.dumps({"batch": [json.loads(VALID_REQUEST)] * 2})) is not None
