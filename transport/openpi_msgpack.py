"""openpi-client's msgpack-numpy encoding, so openpi clients talk to us unchanged.

An ndarray travels as a map `{b"__ndarray__": True, b"data": <raw C-order bytes>, b"dtype":
dtype.str, b"shape": [...]}` and a numpy scalar as `{b"__npgeneric__": True, b"data": item(),
b"dtype": dtype.str}`; everything else is plain msgpack. Object, void and complex dtypes are
refused both ways, so nothing on the wire can make us run code.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

from transport.errors import ProtocolError

_REFUSED_KINDS = ("O", "V", "c")


def _check_dtype(dtype: np.dtype) -> None:
    if dtype.kind in _REFUSED_KINDS:
        raise ProtocolError(f"dtype {dtype} cannot travel (object, void and complex arrays are refused)", "bad_dtype")


def _encode(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        _check_dtype(obj.dtype)
        return {
            b"__ndarray__": True,
            b"data": np.ascontiguousarray(obj).tobytes(),
            b"dtype": obj.dtype.str,
            b"shape": obj.shape,
        }
    if isinstance(obj, np.generic):
        _check_dtype(obj.dtype)
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    return obj


def _decode(obj: dict) -> Any:
    if b"__ndarray__" in obj:
        try:
            dtype = np.dtype(obj[b"dtype"])
            _check_dtype(dtype)
            return np.ndarray(buffer=obj[b"data"], dtype=dtype, shape=tuple(obj[b"shape"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ProtocolError(f"malformed ndarray in the message: {e}", "bad_array") from None
    if b"__npgeneric__" in obj:
        try:
            dtype = np.dtype(obj[b"dtype"])
            _check_dtype(dtype)
            return dtype.type(obj[b"data"])
        except (KeyError, TypeError, ValueError) as e:
            raise ProtocolError(f"malformed numpy scalar in the message: {e}", "bad_array") from None
    return obj


def packb(obj: Any) -> bytes:
    return msgpack.packb(obj, default=_encode, use_bin_type=True)


def unpackb(data: bytes) -> Any:
    try:
        return msgpack.unpackb(data, object_hook=_decode, raw=False, strict_map_key=False)
    except ProtocolError:
        raise
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, TypeError) as e:
        raise ProtocolError(f"message is not valid msgpack: {e}", "bad_message") from None
