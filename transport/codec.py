"""The ZMQ wire format: one msgpack header frame, then one raw frame per array.

Pure functions, no sockets. `encode` returns the frames to send (arrays as zero-copy memoryviews);
`decode` takes received frames (bytes, memoryviews or `zmq.Frame`s) and rebuilds arrays as
read-only `np.frombuffer` views over them. Only the dtypes in `DTYPES` travel; no pickle, no object
arrays. The layout is documented byte for byte in docs/protocol.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import msgpack
import numpy as np

from transport.errors import ProtocolError

PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 64 * 1024
MAX_ARRAYS = 64
MAX_NDIM = 8

# Little-endian (or byte-order-free) numeric dtypes, by their numpy `dtype.str`.
DTYPES = frozenset(
    np.dtype(t).newbyteorder("<").str
    for t in (
        "bool",
        "uint8",
        "int8",
        "uint16",
        "int16",
        "uint32",
        "int32",
        "uint64",
        "int64",
        "float16",
        "float32",
        "float64",
    )
)


def _buffer(frame: Any) -> memoryview:
    buf = getattr(frame, "buffer", frame)  # zmq.Frame exposes .buffer; bytes and memoryview pass
    return memoryview(buf)


def encode(header: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None = None) -> list[bytes | memoryview]:
    """Frames for `header` (a dict without `arrays`) and `arrays` (name -> ndarray, in order)."""
    arrays = arrays or {}
    descriptors, buffers = [], []
    for name, value in arrays.items():
        arr = np.asarray(value)
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        if arr.dtype.str not in DTYPES:
            raise ProtocolError(f"array {name!r} has dtype {arr.dtype} which cannot travel; allowed: {sorted(DTYPES)}")
        arr = arr if arr.flags.c_contiguous else arr.copy(order="C")  # ascontiguousarray would make 0-D 1-D
        descriptors.append({"name": name, "dtype": arr.dtype.str, "shape": list(arr.shape)})
        buffers.append(memoryview(arr).cast("B") if arr.size else b"")
    head = dict(header)
    head["v"] = PROTOCOL_VERSION
    head["arrays"] = descriptors
    return [msgpack.packb(head, use_bin_type=True), *buffers]


def decode(frames: Sequence[Any]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(header, arrays) from received frames; raises `ProtocolError` saying exactly what is wrong."""
    if not frames:
        raise ProtocolError("empty message: expected a msgpack header frame")
    raw = _buffer(frames[0])
    if raw.nbytes > MAX_HEADER_BYTES:
        raise ProtocolError(f"header frame is {raw.nbytes} bytes, more than {MAX_HEADER_BYTES}", "oversize")
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True, max_bin_len=0, max_ext_len=0)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, TypeError) as e:
        raise ProtocolError(f"header frame is not valid msgpack: {e}", "bad_header") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"header must be a msgpack map, got {type(header).__name__}", "bad_header")
    if header.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(
            f"unsupported protocol version {header.get('v')!r}; this server speaks {PROTOCOL_VERSION}", "bad_version"
        )
    descriptors = header.get("arrays", [])
    if not isinstance(descriptors, list) or len(descriptors) > MAX_ARRAYS:
        raise ProtocolError(f"header 'arrays' must be a list of at most {MAX_ARRAYS} descriptors", "bad_header")
    if len(frames) != 1 + len(descriptors):
        raise ProtocolError(
            f"header describes {len(descriptors)} arrays but {len(frames) - 1} array frames followed", "bad_frames"
        )
    arrays: dict[str, np.ndarray] = {}
    for i, (desc, frame) in enumerate(zip(descriptors, frames[1:], strict=True)):
        name, dtype, shape = _descriptor(desc, i)
        if name in arrays:
            raise ProtocolError(f"array {name!r} appears twice", "bad_header")
        buf = _buffer(frame)
        expected = math.prod(shape) * dtype.itemsize
        if buf.nbytes != expected:
            raise ProtocolError(
                f"array {name!r} ({dtype.str} {tuple(shape)}) needs {expected} bytes, its frame has {buf.nbytes}",
                "bad_frames",
            )
        arr = np.frombuffer(buf, dtype=dtype).reshape(tuple(shape)) if expected else np.zeros(shape, dtype)
        arr.flags.writeable = False
        arrays[name] = arr
    del header["arrays"]
    return header, arrays


def _descriptor(desc: Any, i: int) -> tuple[str, np.dtype, list[int]]:
    if not isinstance(desc, dict):
        raise ProtocolError(f"array descriptor {i} must be a map with name, dtype, shape", "bad_header")
    name, dtype, shape = desc.get("name"), desc.get("dtype"), desc.get("shape")
    if not isinstance(name, str) or not name:
        raise ProtocolError(f"array descriptor {i} has no name", "bad_header")
    if dtype not in DTYPES:
        raise ProtocolError(f"array {name!r}: dtype {dtype!r} is not allowed; allowed: {sorted(DTYPES)}", "bad_dtype")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in shape)
    ):
        raise ProtocolError(f"array {name!r}: shape {shape!r} must be a list of at most {MAX_NDIM} sizes", "bad_header")
    return name, np.dtype(dtype), shape
