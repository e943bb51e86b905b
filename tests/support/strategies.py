"""Hostile input for the three wires, as hypothesis strategies: ZMQ frames (a msgpack header and raw
array frames), the JSON WebSocket API and openpi's msgpack protocol.

The decoders' fuzzers (tests/transport/test_fuzz.py) and the live server's hostile tests
(tests/runtime/test_hostile_server.py) draw from the same pools, so a hostile value found for one
reaches both. Each test keeps its own message builders (from scratch there, mutating a valid
request here); what they are made of is defined here once:

- values the encoders will not write (lone surrogates, invalid UTF-8, deep nesting, 1e400), as
  placeholders that `packb` and `dumps` splice into the encoded bytes;
- msgpack and JSON value trees, keys and scalars;
- the ZMQ header's fields, types and options, and array descriptors (names, dtypes, shapes);
- openpi's `__ndarray__` maps, whole or broken;
- the valid requests mutations start from, and cheap byte, frame and text mutations driven by a
  `random.Random` (no hypothesis draw each).
"""

from __future__ import annotations

import json
import math
import random
import struct
from typing import Any

import msgpack
import numpy as np
from hypothesis import strategies as st

from tests.support.raw_dealer import image
from transport import codec
from transport.messages import PREV_ACTIONS, REPLY_TYPE, WIRE_OPTIONS

# ---- values no encoder writes: placeholders, replaced in the encoded bytes or text

LONE_SURROGATE = "\x00lone-surrogate\x00"
INVALID_UTF8 = "\x00invalid-utf8\x00"
DEEP = "\x00nested-2000-deep\x00"
_MSGPACK_SPLICE = {LONE_SURROGATE: b"\xa3\xed\xa0\x80", INVALID_UTF8: b"\xa2\xff\xfe", DEEP: b"\x91" * 2000 + b"\x00"}

# Raw JSON text where a placeholder string stands (valid JSON that Python cannot write, JSON's
# limits, or text cut short): keys and values alike.
RAW_JSON = {
    "\x00raw:1e400\x00": "1e400",
    "\x00raw:-1e400\x00": "-1e400",
    "\x00raw:digits\x00": "1" * 5000,
    "\x00raw:-digits\x00": "-" + "9" * 5000,
    "\x00raw:NaN\x00": "NaN",
    "\x00raw:Infinity\x00": "Infinity",
    "\x00raw:-Infinity\x00": "-Infinity",
    "\x00raw:surrogate\x00": '"\\ud800"',
    "\x00raw:surrogate2\x00": '"go \\udfff"',
    "\x00raw:nul\x00": '"a\\u0000b"',
    "\x00raw:deep\x00": "[" * 3000 + "]" * 3000,
    "\x00raw:open-deep\x00": "[" * 3000,
    "\x00raw:open-object\x00": '{"a":' * 3000,
    "\x00raw:big-int\x00": "123456789012345678901234567890",
    "\x00raw:tiny\x00": "1e-400",
    "\x00raw:dupkeys\x00": '{"a": 1, "a": 2}',
}
_RAW_KEYS = sorted(RAW_JSON)


def packb(value: Any) -> bytes:
    """msgpack of `value`, with the placeholders above replaced by what they stand for."""
    data = msgpack.packb(value, use_bin_type=True)
    for placeholder, raw in _MSGPACK_SPLICE.items():
        data = data.replace(msgpack.packb(placeholder), raw)
    return data


def dumps(value: Any) -> str:
    """JSON text of `value`, with the `RAW_JSON` placeholders replaced by their raw text."""
    text = json.dumps(value)
    for placeholder, raw in RAW_JSON.items():
        text = text.replace(json.dumps(placeholder), raw)
    return text


def nested(depth: int, leaf: Any = 0) -> Any:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


# ---- msgpack values

# msgpack refuses lone surrogates: `LONE_SURROGATE` stands for them.
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=30)
INTS = st.integers(-(2**63), 2**64 - 1)  # all msgpack can carry
SPECIAL_SCALARS = [
    2**64 - 1, -(2**63), 2**63, 2**31, -1, 0, math.nan, math.inf, -math.inf, 5e-324, "", "@json/1-1", "x" * 5000,
    LONE_SURROGATE, INVALID_UTF8, "infer", "ping", "bye",
]  # fmt: skip
msgpack_scalars = st.one_of(
    st.none(), st.booleans(), INTS, st.floats(), TEXT, st.binary(max_size=30), st.sampled_from(SPECIAL_SCALARS)
)
# Half text, half what a strict map refuses as a key.
msgpack_keys = TEXT | st.one_of(st.integers(-5, 5), st.binary(max_size=5), st.none(), st.booleans())


def msgpack_trees(leaves: st.SearchStrategy) -> st.SearchStrategy:
    """Lists and maps (of any msgpack key) of `leaves`, up to eight of them."""
    return st.recursive(
        leaves,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(msgpack_keys, inner, max_size=4),
        max_leaves=8,
    )


# ---- array descriptors: names, dtypes, shapes

VALID_DTYPES = sorted(codec.DTYPES)
ODD_DTYPES = [
    "T", "<U4", "|S4", "O", "|O", "|V8", "<c8", "<c16", ">f4", ">i8", "<M8[s]", "<m8[ns]", "float32",
    "f4", "<f4 ", "", "<f16", "|u1\x00", "b", "?", "<f4,<f4", "(2,)<f4", "|u1|u1",
]  # fmt: skip
DTYPE_NAMES = st.sampled_from(ODD_DTYPES + VALID_DTYPES)
ODD_SHAPES = [
    [0] + [2**31 - 1] * 7, [2**31 - 1] * 8, [2**31], [-1], [2**63 - 1], [2**64 - 1], [-(2**63)], [1] * 9,
    [0] * 9, [], [0], [3.0], [True], ["3"], None, {}, [[8]], [8, 8, 3, 1], [8, 8], [192], [65536, 65536, 3],
    [4097, 1, 3], [1, 1, 3], [0, 8, 3],
]  # fmt: skip
msgpack_values = st.one_of(
    msgpack_trees(msgpack_scalars),
    st.sampled_from([nested(100), DEEP, {"a": nested(40)}, msgpack.ExtType(5, b"x"), msgpack.Timestamp(1)]),
    st.lists(DTYPE_NAMES),
)
SHAPES = st.one_of(
    st.sampled_from(ODD_SHAPES),
    st.lists(st.integers(0, 4), max_size=4),
    st.lists(st.integers(-2, 2**40), max_size=9),
    st.lists(st.sampled_from([0, 2**31 - 1, 2**31]), min_size=7, max_size=9),  # products past 2**64
    msgpack_values,
)
ARRAY_NAMES = (
    st.sampled_from(
        ["image/base_0_rgb", "image/left_wrist_0_rgb", "image/bogus", "image/", "image/@", "image/" + "x" * 120,
         "state", "actions", "x" * 200]
    )
    | TEXT
)  # fmt: skip
# What each field of an array's descriptor may be replaced with.
DESCRIPTOR_FIELDS = {"name": ARRAY_NAMES | msgpack_values, "dtype": DTYPE_NAMES | msgpack_values, "shape": SHAPES}

# ---- the ZMQ header

HEADER_FIELDS = ["v", "type", "id", "robot", "ts", "options", "arrays", "data", "extra"]
HEADER_TYPES = st.sampled_from([*REPLY_TYPE, "result", "error", "pong", "", "INFER", "infer\x00"])
OPTION_KEYS = st.sampled_from([*WIRE_OPTIONS, PREV_ACTIONS, "bogus", b"high_level_prompt", 2.5]) | msgpack_keys
HEADERS = st.fixed_dictionaries(
    {},
    optional={
        "type": HEADER_TYPES | msgpack_values,
        "id": msgpack_values,
        "robot": st.sampled_from(["arm", "@gw", ""]) | msgpack_values,
        "ts": msgpack_values,
        "options": st.dictionaries(OPTION_KEYS, msgpack_values, max_size=4) | msgpack_values,
    },
)
# One frame of a message: random bytes, or random msgpack.
FRAMES = st.binary(max_size=200) | msgpack_values.map(packb)

# ---- openpi's arrays


def nd(arr: Any) -> dict[bytes, Any]:
    """openpi's `__ndarray__` map of `arr`, for any dtype (openpi's own `pack_array` refuses some)."""
    arr = np.asarray(arr)
    return {b"__ndarray__": True, b"data": arr.tobytes(), b"dtype": arr.dtype.str, b"shape": list(arr.shape)}


# What a malicious sender of a 'T' (StringDType) array puts in its data: (pointer, length) pairs.
T_DATA = struct.pack("<QQ", 0x400000, 24) * 2


@st.composite
def openpi_arrays(draw) -> dict[bytes, Any]:
    """An `__ndarray__` (or `__npgeneric__`) map: a valid one with one field broken, or crafted whole."""
    base = nd(image(4, 4))
    action = draw(
        st.sampled_from(["dtype", "shape", "data", "missing", "extra", "scalar", "consistent", "sized", "crafted", "t"])
    )
    if action == "dtype":
        base[b"dtype"] = draw(DTYPE_NAMES | msgpack_values)
    elif action == "shape":
        base[b"shape"] = draw(SHAPES)
    elif action == "data":
        base[b"data"] = draw(st.sampled_from([b"", b"x", {}, [], "text", None, 3]) | msgpack_values)
    elif action == "missing":
        del base[draw(st.sampled_from([b"data", b"dtype", b"shape"]))]
    elif action == "extra":
        base[draw(msgpack_keys)] = draw(msgpack_values)
    elif action == "scalar":
        base = {b"__npgeneric__": True, b"data": draw(msgpack_values), b"dtype": draw(DTYPE_NAMES | msgpack_values)}
    elif action == "consistent":  # an allowed dtype, its data as described: the checks past the sizes run
        dtype = draw(st.sampled_from(VALID_DTYPES))
        shape = draw(st.sampled_from([[4, 4, 3], [3, 4, 4], [4, 4], [0, 4, 3], [4097, 1, 3], [1, 1, 3], [7], [8], []]))
        fill = draw(st.sampled_from([0.0, 1.0, 255.0, math.nan, 1e30]))
        with np.errstate(all="ignore"):
            base = nd(np.full(shape, fill).astype(dtype))
    elif action == "sized":  # any dtype string, random data of exactly the described size
        dtype = draw(DTYPE_NAMES)
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        try:
            nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        except (TypeError, ValueError):
            nbytes = 8
        base = {b"__ndarray__": True, b"data": draw(st.binary(min_size=nbytes, max_size=nbytes)), b"dtype": dtype,
                b"shape": shape}  # fmt: skip
    elif action == "crafted":  # every field at once
        base = {
            b"__ndarray__": True,
            b"data": draw(st.binary(max_size=32) | msgpack_values),
            b"dtype": draw(DTYPE_NAMES | msgpack_values),
            b"shape": draw(SHAPES),
        }
    else:
        base = {b"__ndarray__": True, b"data": T_DATA, b"dtype": "T", b"shape": [2]}
    return base


# ---- JSON values

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(-(2**200), 2**200),
    st.floats(allow_nan=False, allow_infinity=False),  # NaN and the infinities: as `RAW_JSON`
    st.text(max_size=20),
    st.sampled_from(_RAW_KEYS),
    st.sampled_from(["", "base_0_rgb", "x" * 5000, 0, -1, 256, 1.5, 2**64, -(2**63) - 1, 1e308, 5e-324]),
)
json_keys = st.text(max_size=8) | st.sampled_from(_RAW_KEYS)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(json_keys, inner, max_size=4),
    max_leaves=8,
)
JSON_FIELDS = ["images", "state", *WIRE_OPTIONS, PREV_ACTIONS, "batch", "type", "id", "bogus"]

# ---- valid requests, where mutations start


def valid_json_request(seed: int = 0) -> dict[str, Any]:
    return {
        "images": {"base_0_rgb": image(4, 4, seed).tolist()},
        "high_level_prompt": "pick up the cup",
        "state": [0.25] * 8,
        "generate_subtask": False,
    }


def valid_openpi_observation(seed: int = 0) -> dict[str, Any]:
    """What openpi's DROID client sends."""
    rng = np.random.default_rng(seed)
    return {
        "observation/exterior_image_1_left": nd(image(8, 8, seed)),
        "observation/wrist_image_left": nd(image(8, 8, seed + 1)),
        "observation/joint_position": nd(rng.uniform(-1, 1, 7)),
        "observation/gripper_position": nd(rng.uniform(0, 1, 1)),
        "prompt": "do something",
    }


# ---- cheap mutations, many per drawn input

MUTATION_CHARS = '[]{},:"0123456789.-eE \\u'


def mutate_bytes(data: bytes, rnd: random.Random) -> bytes:
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


def mutate_frames(frames: list[bytes], rnd: random.Random) -> list[bytes]:
    """Bytes of one frame edited, or frames dropped, repeated or added."""
    frames = list(frames)
    if rnd.random() < 0.7 and frames:
        i = rnd.randrange(len(frames))
        frames[i] = mutate_bytes(frames[i], rnd)
    elif rnd.random() < 0.5 and frames:
        del frames[rnd.randrange(len(frames))]
    else:
        frames.insert(
            rnd.randint(0, len(frames)), rnd.choice([*frames, b"", bytes(rnd.randrange(256) for _ in range(8))])
        )
    return frames


def mutate_text(text: str, rnd: random.Random) -> str:
    """One to three spliced-in raw JSON values, JSON fragments or cuts."""
    for _ in range(rnd.randint(1, 3)):
        at = rnd.randint(0, len(text))
        splice = rnd.choice(
            [rnd.choice(list(RAW_JSON.values())), "".join(rnd.choices(MUTATION_CHARS, k=rnd.randint(0, 4)))]
        )
        text = text[:at] + splice + text[at + rnd.randint(0, 3) :]
    return text
