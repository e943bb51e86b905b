"""The ZMQ frame codec: exact bytes, round trips and precise errors."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from transport import codec
from transport.errors import ProtocolError


def test_exact_bytes_of_a_small_message():
    frames = codec.encode({"type": "ping", "id": 7}, {"x": np.array([1, 2], np.uint8)})
    assert bytes(frames[0]) == (
        b"\x84\xa4type\xa4ping\xa2id\x07\xa1v\x01\xa6arrays\x91\x83\xa4name\xa1x\xa5dtype\xa3|u1\xa5shape\x91\x02"
    )
    assert bytes(frames[1]) == b"\x01\x02"


@pytest.mark.parametrize(
    "arr",
    [
        np.float64(3.5),  # 0-D
        np.zeros((0, 3), np.float32),  # empty
        np.arange(24, dtype=np.int32).reshape(4, 6)[:, ::2],  # non-contiguous
        np.array([np.nan, np.inf, -np.inf, 0.0], np.float32),
        np.arange(6, dtype=">f4"),  # big-endian: sent little-endian
        np.array([True, False]),
        np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8),
    ],
)
def test_round_trip(arr):
    header, arrays = codec.decode(codec.encode({"type": "t"}, {"a": arr}))
    out = arrays["a"]
    assert out.shape == np.shape(arr) and out.dtype == np.asarray(arr).dtype.newbyteorder("<")
    np.testing.assert_array_equal(out, arr)
    assert not out.flags.writeable
    assert header == {"type": "t", "v": 1}


def test_decoded_arrays_are_views_over_the_frames():
    payload = bytearray(np.arange(4, dtype=np.float32).tobytes())
    frames = [codec.encode({"type": "t"}, {"a": np.zeros(4, np.float32)})[0], memoryview(payload)]
    _, arrays = codec.decode(frames)
    payload[0:4] = np.float32(9).tobytes()
    assert arrays["a"][0] == 9  # no copy was made


def test_object_arrays_never_travel():
    with pytest.raises(ProtocolError, match="cannot travel"):
        codec.encode({}, {"a": np.array([{"x": 1}], dtype=object)})


def _header(**fields):
    return msgpack.packb({"v": 1, "type": "infer", **fields})


@pytest.mark.parametrize(
    ("frames", "code", "message"),
    [
        ([], "bad_message", "empty message"),
        ([b"\xc1"], "bad_header", "not valid msgpack"),
        ([msgpack.packb([1, 2])], "bad_header", "must be a msgpack map"),
        ([msgpack.packb({"v": 99})], "bad_version", "unsupported protocol version 99"),
        ([_header(arrays=[{"name": "a", "dtype": "<f4", "shape": [2]}])], "bad_frames", "describes 1 arrays but 0"),
        ([_header(arrays=[{"name": "a", "dtype": "<f4", "shape": [2]}]), b"abc"], "bad_frames", "needs 8 bytes"),
        ([_header(arrays=[{"name": "a", "dtype": "|O", "shape": [1]}]), b"12345678"], "bad_dtype", "not allowed"),
        ([_header(arrays=[{"name": "a", "dtype": "<f4", "shape": [-1]}]), b""], "bad_header", "shape"),
        ([_header(arrays=["a"]), b""], "bad_header", "must be a map"),
        ([b"\x00" * (codec.MAX_HEADER_BYTES + 1)], "oversize", "header frame is"),
    ],
)
def test_malformed_messages_raise_typed_errors(frames, code, message):
    with pytest.raises(ProtocolError, match=message) as info:
        codec.decode(frames)
    assert info.value.code == code


def _frames(header: dict, *arrays: bytes) -> list[bytes]:
    return [msgpack.packb({"v": 1, **header}, use_bin_type=True), *arrays]


def _code(frames) -> str:
    with pytest.raises(ProtocolError) as info:
        codec.decode(frames)
    return info.value.code


def test_a_header_without_arrays_decodes_to_no_arrays():
    # Issue 9: `del header["arrays"]` raised KeyError and killed the ROUTER's receive task.
    header, arrays = codec.decode(_frames({"type": "ping", "id": 3}))
    assert header == {"v": 1, "type": "ping", "id": 3} and arrays == {}
    assert _code(_frames({"type": "ping"}, b"\x00")) == "bad_frames"


@pytest.mark.parametrize("dtype", [["<f4"], {"a": 1}, 4, None, True, b"", "T", "|O", "<U4", ">f4", "(2,)<f4", "f4"])
def test_a_dtype_outside_the_allow_list_is_bad_dtype(dtype):
    # A list or map as dtype raised TypeError (unhashable) at `dtype not in DTYPES`.
    frames = [msgpack.packb({"v": 1, "arrays": [{"name": "a", "dtype": dtype, "shape": [1]}]}), b"\x00" * 4]
    assert _code(frames) == "bad_dtype"


@pytest.mark.parametrize(
    "shape",
    [
        [0] + [2**31 - 1] * 7,  # zero bytes, but numpy refuses to build it ("array is too big")
        [2**31 - 1] * 8,
        [2**31],
        [-1],
        [True],
        [1.0],
        [[2]],
        {"0": 1},
        "3",
        [1] * (codec.MAX_NDIM + 1),
    ],
)
def test_shapes_that_are_not_small_sizes_are_bad_header(shape):
    frames = [msgpack.packb({"v": 1, "arrays": [{"name": "a", "dtype": "|u1", "shape": shape}]}), b""]
    assert _code(frames) == "bad_header"


def test_a_frame_of_the_wrong_size_names_its_array():
    good = {"name": "a", "dtype": "<f4", "shape": [2]}
    bad = {"name": "b", "dtype": "<f4", "shape": [3]}
    with pytest.raises(ProtocolError, match=r"'b'.*needs 12 bytes, its frame has 8"):
        codec.decode([msgpack.packb({"v": 1, "arrays": [good, bad]}), b"\x00" * 8, b"\x00" * 8])


def _with_array(name) -> list[bytes]:
    return [msgpack.packb({"v": 1, "arrays": [{"name": name, "dtype": "|u1", "shape": [0]}]}), b""]


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        ([msgpack.packb({"v": True})], "bad_version"),  # True == 1 in Python
        ([msgpack.packb({"v": 1.0})], "bad_version"),
        ([msgpack.packb({"v": [1]})], "bad_version"),
        ([msgpack.packb({"v": 1, "arrays": {"a": 1}})], "bad_header"),
        (_with_array(["a"]), "bad_header"),
        (_with_array(""), "bad_header"),
        (_with_array("x" * (codec.MAX_NAME_CHARS + 1)), "bad_header"),
    ],
)
def test_header_fields_of_the_wrong_type(frames, code):
    assert _code(frames) == code


def test_map_keys_that_are_not_strings_are_bad_header():
    assert _code([msgpack.packb({"v": 1, "options": {1: 2}})]) == "bad_header"
    assert _code([msgpack.packb({"v": 1, 2.5: 0})]) == "bad_header"


def test_duplicate_array_names():
    desc = {"name": "a", "dtype": "|u1", "shape": [1]}
    with pytest.raises(ProtocolError, match="'a' appears twice"):
        codec.decode([msgpack.packb({"v": 1, "arrays": [desc, desc]}), b"\x00", b"\x00"])


@pytest.mark.parametrize(
    ("frames", "expected"),
    [
        (_frames({"id": 5}), 5),
        (_frames({"id": "req-1"}), "req-1"),
        (_frames({"id": [5]}), None),
        (_frames({"id": "x" * (codec.MAX_ID_CHARS + 1)}), None),
        ([msgpack.packb([1])], None),
        ([b"\xc1"], None),
        ([], None),
    ],
)
def test_request_id_reads_what_it_safely_can(frames, expected):
    assert codec.request_id(frames) == expected


def test_request_id_of_an_oversize_header_is_scanned_not_unpacked(monkeypatch):
    # Issue 9: `_header_id` unpacked a 60 MB header frame on the oversize path; yet a robot needs
    # the id in the error reply to match it to its request.
    frame = msgpack.packb({"pad": "x" * codec.MAX_HEADER_BYTES, "id": 5})
    assert len(frame) > codec.MAX_HEADER_BYTES
    monkeypatch.setattr(msgpack, "unpackb", lambda *a, **k: pytest.fail("an oversize header was unpacked"))
    assert codec.request_id([frame]) == 5
    keys = {f"k{i}": i for i in range(codec.MAX_SCANNED_KEYS)}
    assert codec.request_id([msgpack.packb({**keys, "pad": "x" * codec.MAX_HEADER_BYTES, "id": 5})]) is None
    assert codec.request_id([msgpack.packb({"id": [5], "pad": "x" * codec.MAX_HEADER_BYTES})]) is None
    monkeypatch.undo()
    assert codec.request_id([msgpack.packb({"id": 5, "pad": "x" * 100})]) == 5
