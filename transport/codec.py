"""The ZMQ wire format: one msgpack header frame, then one raw frame per array.

Pure functions, no sockets. `encode` returns the frames to send (arrays as zero-copy memoryviews);
`decode` takes received frames (bytes, memoryviews or `zmq.Frame`s) and rebuilds arrays as
read-only array views over them (no copy). Only the dtypes in `DTYPES` travel; no pickle, no object
arrays. The layout is documented byte for byte in docs/protocol.md.

Decoding trusts nothing: every field is type-checked before it is used, so any input gives either
the message or a `ProtocolError` with a code, and every size (header bytes, array count, rank,
dimensions, bytes per array) is checked before anything is allocated.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import msgpack
import numpy as np

from transport.errors import ProtocolError, describe

PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 64 * 1024
MAX_ARRAYS = 64
MAX_NDIM = 8
MAX_DIM = 2**31 - 1
# Bytes of one array, counting zero-length dimensions as 1: numpy refuses to build even an empty
# array whose other dimensions multiply past its index range (a shape like [0] + [2**31 - 1] * 7).
MAX_ARRAY_BYTES = 2**32
MAX_NAME_CHARS = 128
MAX_ID_CHARS = 256

# Little-endian (or byte-order-free) bool, integer and float dtypes, by their numpy `dtype.str`:
# an allow-list of strings, so no wire value ever reaches `np.dtype`'s parser.
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
_ALLOWED = " ".join(sorted(DTYPES))
_DTYPE_OF = {name: np.dtype(name) for name in DTYPES}  # built once: `np.dtype(name)` parses on every call


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _buffer(frame: Any) -> memoryview:
    buf = getattr(frame, "buffer", frame)  # zmq.Frame exposes .buffer; bytes and memoryview pass
    return memoryview(buf)


def wire_array(value: Any, what: str) -> np.ndarray:
    """`value` as it travels: an allowed dtype, little-endian, C-contiguous (0-D stays 0-D)."""
    arr = np.asarray(value)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    if arr.dtype.str not in DTYPES:
        raise ProtocolError(f"{what} has dtype {arr.dtype} which cannot travel; allowed: {_ALLOWED}", "bad_dtype")
    return arr if arr.flags.c_contiguous else arr.copy(order="C")  # ascontiguousarray would make 0-D 1-D


def array_spec(dtype: Any, shape: Any, what: str, code: str) -> tuple[np.dtype, tuple[int, ...], int]:
    """(dtype, shape, byte count) of an array described on the wire, all checked and bounded.

    `dtype` must be one of `DTYPES` (`bad_dtype`); `shape` a list of at most `MAX_NDIM` sizes
    0..`MAX_DIM` whose byte count is at most `MAX_ARRAY_BYTES` (`code`).
    """
    dt = _DTYPE_OF.get(dtype) if isinstance(dtype, str) else None
    if dt is None:
        raise ProtocolError(f"{what}: dtype {describe(dtype)} is not allowed; allowed: {_ALLOWED}", "bad_dtype")
    # A plain loop with `type(d) is int` (bool excluded): this runs for every array of every request.
    bound = nbytes = dt.itemsize  # the bound counts zero-length dimensions as 1
    if isinstance(shape, (list, tuple)) and len(shape) <= MAX_NDIM:
        for d in shape:
            if type(d) is not int or not 0 <= d <= MAX_DIM:
                break
            bound *= d or 1
            nbytes *= d
        else:
            if bound > MAX_ARRAY_BYTES:
                raise ProtocolError(f"{what}: shape {list(shape)} is larger than {MAX_ARRAY_BYTES} bytes", code)
            return dt, tuple(shape), nbytes
    raise ProtocolError(
        f"{what}: shape must be a list of at most {MAX_NDIM} sizes 0..{MAX_DIM}, got {describe(shape)}", code
    )


def is_request_id(value: Any) -> bool:
    """A request id the server echoes: nil, an integer msgpack can carry, or a string of at most
    `MAX_ID_CHARS` characters."""
    if value is None:
        return True
    if _is_int(value):
        return -(2**63) <= value < 2**64
    return isinstance(value, str) and len(value) <= MAX_ID_CHARS


def encode(header: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None = None) -> list[bytes | memoryview]:
    """Frames for `header` (a dict without `arrays`) and `arrays` (name -> ndarray, in order)."""
    descriptors, buffers = [], []
    if arrays:
        for name, value in arrays.items():
            arr = value  # most arrays travel as they are: three cheap looks instead of a call
            if type(arr) is not np.ndarray or arr.dtype.str not in DTYPES or not arr.flags.c_contiguous:
                arr = wire_array(value, f"array {name!r}")
            descriptors.append({"name": name, "dtype": arr.dtype.str, "shape": list(arr.shape)})
            buffers.append(memoryview(arr).cast("B") if arr.size else b"")
    head = dict(header)
    head["v"] = PROTOCOL_VERSION
    head["arrays"] = descriptors
    return [msgpack.packb(head, use_bin_type=True), *buffers]


def _unpack_header(frames: Sequence[Any]) -> Any:
    """Frame 0 unpacked, its size checked first; any failure is a `ProtocolError`."""
    if not frames:
        raise ProtocolError("empty message: expected a msgpack header frame")
    raw = _buffer(frames[0])
    if raw.nbytes > MAX_HEADER_BYTES:
        raise ProtocolError(f"header frame is {raw.nbytes} bytes, more than {MAX_HEADER_BYTES}", "oversize")
    try:
        # Every length inside is bounded by the frame's (msgpack's default), nesting by its stack.
        return msgpack.unpackb(raw, raw=False, strict_map_key=True, max_bin_len=0, max_ext_len=0)
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise ProtocolError(f"header frame is not valid msgpack: {e}", "bad_header") from None


MAX_SCANNED_KEYS = 16


def request_id(frames: Sequence[Any]) -> int | str | None:
    """The id of a message that failed to decode, so that its error reply can name it (a client
    matches replies by id); None when the header cannot be read or its id is not a valid one.

    Never raises. An oversize header frame is not unpacked: its top-level keys are scanned in a
    stream, every other value skipped unread, at most `MAX_SCANNED_KEYS` of them."""
    if not frames:
        return None
    if _buffer(frames[0]).nbytes <= MAX_HEADER_BYTES:
        try:
            header = _unpack_header(frames)
        except ProtocolError:
            return None
        value = header.get("id") if isinstance(header, dict) else None
        return value if is_request_id(value) else None
    try:
        unpacker = msgpack.Unpacker(io.BytesIO(_buffer(frames[0])), raw=False, max_bin_len=0, max_ext_len=0)
        for _ in range(min(unpacker.read_map_header(), MAX_SCANNED_KEYS)):
            if unpacker.unpack() == "id":
                value = unpacker.unpack()
                return value if is_request_id(value) else None
            unpacker.skip()
    except Exception:  # any garbage: the error reply then carries no id
        return None
    return None


def decode(frames: Sequence[Any]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(header without `arrays`, arrays) from received frames; raises `ProtocolError` saying
    exactly what is wrong. The header's other fields are left to the caller to check."""
    header = _unpack_header(frames)
    if not isinstance(header, dict):
        raise ProtocolError(f"header must be a msgpack map, got {describe(header)}", "bad_header")
    version = header.get("v")
    if not (_is_int(version) and version == PROTOCOL_VERSION):
        raise ProtocolError(
            f"unsupported protocol version {describe(version)}; this server speaks {PROTOCOL_VERSION}", "bad_version"
        )
    descriptors = header.pop("arrays", [])
    if not isinstance(descriptors, list) or len(descriptors) > MAX_ARRAYS:
        raise ProtocolError(f"header 'arrays' must be a list of at most {MAX_ARRAYS} descriptors", "bad_header")
    if len(frames) != 1 + len(descriptors):
        raise ProtocolError(
            f"header describes {len(descriptors)} arrays but {len(frames) - 1} array frames followed", "bad_frames"
        )
    # One pass, each array checked before it is built; an array is a read-only view over its frame
    # (`np.ndarray` over a read-only buffer: one call where `frombuffer` and `reshape` are two).
    arrays: dict[str, np.ndarray] = {}
    for i, desc in enumerate(descriptors):
        name, dtype, shape, nbytes = _descriptor(desc, i)
        if name in arrays:
            raise ProtocolError(f"array {name!r} appears twice", "bad_header")
        buf = _buffer(frames[i + 1])
        if buf.nbytes != nbytes:
            raise ProtocolError(
                f"array {name!r} ({dtype.str} {shape}) needs {nbytes} bytes, its frame has {buf.nbytes}", "bad_frames"
            )
        arrays[name] = np.ndarray(shape, dtype, buf.toreadonly())
    return header, arrays


def _descriptor(desc: Any, i: int) -> tuple[str, np.dtype, tuple[int, ...], int]:
    if not isinstance(desc, dict):
        raise ProtocolError(f"array descriptor {i} must be a map with name, dtype, shape", "bad_header")
    name = desc.get("name")
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS:
        raise ProtocolError(f"array descriptor {i}: name must be a string of 1..{MAX_NAME_CHARS} chars", "bad_header")
    return name, *array_spec(desc.get("dtype"), desc.get("shape"), f"array {name!r}", "bad_header")
