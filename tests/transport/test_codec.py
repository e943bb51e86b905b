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
