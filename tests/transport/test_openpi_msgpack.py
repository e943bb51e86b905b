"""openpi's msgpack-numpy: byte-compatible with openpi-client, and nothing on the wire can crash us
or make us read memory."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from openpi_client import msgpack_numpy as openpi

from transport import openpi_msgpack
from transport.errors import ProtocolError


def _observation() -> dict:
    rng = np.random.default_rng(0)
    return {
        "observation/exterior_image_1_left": rng.integers(0, 256, (8, 6, 3), dtype=np.uint8),
        "observation/joint_position": rng.standard_normal(7),
        "observation/gripper_position": np.float32(0.25),
        "flags": np.array([True, False]),
        "step": np.int64(-3),
        "empty": np.zeros((0, 4), np.float32),
        "prompt": "pick up the fork",
        "nested": {"cams": {"a": np.arange(3, dtype=np.uint16)}},
    }


def _assert_same(a, b) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, np.ndarray | np.generic):
        assert type(a) is type(b) and a.dtype == b.dtype and np.shape(a) == np.shape(b)
        np.testing.assert_array_equal(a, b)
    else:
        assert a == b


def test_openpi_clients_messages_decode_and_ours_decode_in_openpi():
    obs = _observation()
    _assert_same(openpi_msgpack.unpackb(openpi.packb(obs)), obs)
    _assert_same(openpi.unpackb(openpi_msgpack.packb(obs)), obs)
    assert openpi_msgpack.packb(obs) == openpi.packb(obs)


def test_decoded_arrays_are_read_only_views():
    out = openpi_msgpack.unpackb(openpi.packb({"a": np.arange(4, dtype=np.int32)}))["a"]
    assert not out.flags.writeable and not out.flags.owndata


def _ndarray(data=b"\x00" * 8, dtype="<f4", shape=(2,)) -> bytes:
    fields = {b"__ndarray__": True, b"data": data, b"dtype": dtype, b"shape": shape}
    return msgpack.packb({"x": fields}, use_bin_type=True)


def _scalar(dtype, data) -> bytes:
    return msgpack.packb({"x": {b"__npgeneric__": True, b"data": data, b"dtype": dtype}}, use_bin_type=True)


def _code(data: bytes) -> str:
    with pytest.raises(ProtocolError) as info:
        openpi_msgpack.unpackb(data)
    return info.value.code


def test_the_variable_width_string_dtype_is_refused():
    # Issue 9: dtype 'T' made numpy read (pointer, length) pairs from the wire: SIGSEGV on a bogus
    # pointer, and the server's own memory sent back on a valid one.
    pointer = np.array([0x400000, 24], np.uint64).tobytes()
    assert _code(_ndarray(data=pointer, dtype="T", shape=[1])) == "bad_dtype"
    assert _code(_ndarray(data=b"\x00" * 16, dtype="T", shape=[1])) == "bad_dtype"
    assert _code(_scalar("T", "x")) == "bad_dtype"


@pytest.mark.parametrize(
    "dtype", ["|O", "|O8", "<U4", "|S4", "|V8", "<c8", "<M8[s]", "<m8[s]", ">f4", "(2,)<f4", "f4", "float32", 5, None]
)
def test_only_bool_int_and_float_dtypes_travel(dtype):
    assert _code(_ndarray(dtype=dtype, shape=[1])) == "bad_dtype"
    assert _code(_scalar(dtype, 0)) == "bad_dtype"


def test_encoding_refuses_what_decoding_refuses():
    for value in (np.array(["a"]), np.array([1 + 2j]), np.array([{}], dtype=object), np.datetime64(1, "s")):
        with pytest.raises(ProtocolError):
            openpi_msgpack.packb({"x": value})
    out = openpi_msgpack.unpackb(openpi_msgpack.packb({"x": np.arange(3, dtype=">i4")}))["x"]
    assert out.dtype == np.dtype("<i4") and out.tolist() == [0, 1, 2]


@pytest.mark.parametrize(
    "fields",
    [
        {"data": {"a": 1}},  # a map given as the array's data
        {"data": [0, 0]},
        {"data": "\x00" * 8},
        {"data": b"\x00" * 7},
        {"data": b"\x00" * 9},
        {"dtype": {"descr": "<f4"}},
        {"dtype": ["<f4"]},
        {"shape": {"0": 2}},
        {"shape": 2},
        {"shape": [-2]},
        {"shape": [2.0]},
        {"shape": [0] + [2**31 - 1] * 7},
        {"shape": [2**40]},
        {"shape": [1] * 9},
    ],
)
def test_malformed_arrays_are_typed_errors(fields):
    assert _code(_ndarray(**fields)) in ("bad_array", "bad_dtype")


def test_an_array_whose_data_is_another_array_is_refused():
    inner = {b"__ndarray__": True, b"data": b"\x00" * 8, b"dtype": "<f4", b"shape": [2]}
    assert _code(_ndarray(data=inner)) == "bad_array"


@pytest.mark.parametrize(
    ("dtype", "data"),
    [("|i1", 300), ("|u1", -1), ("<u8", -1), ("<i4", 1.5), ("|b1", 1), ("<i8", True), ("<f2", 1e10), ("<f4", "1")],
)
def test_scalars_must_fit_their_dtype(dtype, data):
    assert _code(_scalar(dtype, data)) == "bad_array"


@pytest.mark.parametrize(
    ("dtype", "data"), [("|i1", -128), ("<u8", 2**64 - 1), ("|b1", True), ("<f2", 65504.0), ("<f4", float("inf"))]
)
def test_scalars_at_the_edges_of_their_dtype(dtype, data):
    out = openpi_msgpack.unpackb(_scalar(dtype, data))["x"]
    assert out.dtype == np.dtype(dtype) and out == data


def test_nesting_is_bounded():
    def nested(depth: int) -> bytes:
        return b"\x91" * (depth - 1) + b"\x90"

    assert openpi_msgpack.unpackb(nested(openpi_msgpack.MAX_DEPTH)) is not None
    assert _code(nested(openpi_msgpack.MAX_DEPTH + 1)) == "bad_message"
    assert _code(nested(100_000)) == "bad_message"  # msgpack's own stack limit


@pytest.mark.parametrize(
    "data", [b"", b"\xc1", b"\x92\x01", b"\x81\x91\x01\x02", msgpack.packb(msgpack.ExtType(5, b"x")), "text"]
)
def test_invalid_msgpack_is_bad_message(data):
    assert _code(data) == "bad_message"


def _never_built(monkeypatch) -> None:
    def never(*args, **kwargs):
        raise AssertionError("msgpack.unpackb ran: the message was not pre-scanned")

    monkeypatch.setattr(openpi_msgpack.msgpack, "unpackb", never)


def _fixarray_tree(levels: int, leaf: bytes) -> bytes:
    """Arrays of 15 inside arrays of 15, `levels` deep, over `leaf`: no header counts many."""
    node = leaf
    for _ in range(levels):
        node = b"\x9f" + node * 15
    return node


@pytest.mark.parametrize(
    "data",
    [
        b"\xdd" + (8_000_000).to_bytes(4, "big") + b"\x80" * 8_000_000,  # one array of 8M empty maps
        b"\xdc\x00\x64" + _fixarray_tree(3, b"\x9f" + b"\x80" * 15) * 100,  # 5M maps, 15 to a header
        b"\xdf" + (1_000_000).to_bytes(4, "big") + b"\xe0\xe0" * 1_000_000,  # a map of uncached negative ints
    ],
)
def test_floods_of_empty_maps_or_small_items_are_refused_before_anything_is_built(monkeypatch, data):
    # The adversary's 8 MB of empty maps took a gateway from 44 MB to 1.2 GB: a 64-byte dict per byte.
    _never_built(monkeypatch)
    with pytest.raises(ProtocolError, match=f"more than {openpi_msgpack.MAX_ITEMS}") as info:
        openpi_msgpack.unpackb(data)
    assert info.value.code == "bad_message"


def test_every_item_counts_toward_the_limit_wherever_it_is_announced():
    most = openpi_msgpack.MAX_ITEMS
    assert len(openpi_msgpack.unpackb(msgpack.packb([0] * (most - 1)))) == most - 1  # the list is an item too
    assert _code(msgpack.packb([0] * most)) == "bad_message"
    # Items after a nested array are announced by the outer one: the total still counts.
    half = most // 2
    assert _code(msgpack.packb([[0] * half, *[0] * half])) == "bad_message"
    assert _code(msgpack.packb({"a": [0] * half, "b": [0] * half})) == "bad_message"


def test_the_prescan_skips_payloads_and_a_large_observation_decodes(monkeypatch):
    # An 8 MB image whose bytes look like msgpack headers (0x80: an empty map; 0xdd: a huge array).
    image = np.frombuffer(b"\x80\xdd" * (720 * 1280 * 3 // 2), np.uint8).reshape(720, 1280, 3)
    obs = {**_observation(), "observation/exterior_image_1_left": image, "prompt": "\x80\xdd" * 2000}
    out = openpi_msgpack.unpackb(openpi.packb(obs))
    _assert_same(out, obs)


@pytest.mark.parametrize(
    "data",
    [
        msgpack.packb({"x": [1, msgpack.ExtType(1, b"x")]}),
        msgpack.packb({"t": msgpack.Timestamp(1)}),  # msgpack's own extension -1
        b"\x81\xa1x\xd4\x05\x00",  # fixext 1
    ],
)
def test_extension_types_are_refused_anywhere(data):
    with pytest.raises(ProtocolError, match="extension types") as info:
        openpi_msgpack.unpackb(data)
    assert info.value.code == "bad_message"


@pytest.mark.parametrize("data", [b"\xdd\x00\x00", b"\xc6\x00\x00\x00\x09abc", b"\x92\x01", b"\x91\xc1", b"\xc0\x01"])
def test_truncated_or_malformed_headers_are_left_to_msgpack(data):
    assert _code(data) == "bad_message"
