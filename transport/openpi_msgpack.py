"""openpi-client's msgpack-numpy encoding, so openpi clients talk to us unchanged.

An ndarray travels as a map `{b"__ndarray__": True, b"data": <raw C-order bytes>, b"dtype":
dtype.str, b"shape": [...]}` and a numpy scalar as `{b"__npgeneric__": True, b"data": item(),
b"dtype": dtype.str}`; everything else is plain msgpack.

Decoding trusts nothing from the wire. A dtype is accepted only from the ZMQ codec's allow-list
(bool, integers, floats; compared as a string, never parsed by `np.dtype`): numpy's variable-width
string dtype `T`, for one, would read its data as (pointer, length) pairs and so dereference
addresses chosen by the sender. Shape and byte count are checked before an array is built, a
scalar's value must fit its dtype, and nesting is bounded, so any input gives a value or a
`ProtocolError` with a code.

Real-time chunking rides in the observation as optional keys (`RTC_KEYS`): `pop_guidance` takes
them out before the layout reads the rest.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np

from transport.codec import array_spec, wire_array
from transport.errors import BadRequest, ProtocolError, describe
from transport.messages import GUIDANCE_OPTIONS, PREV_ACTIONS, RETURN_MODEL_ACTIONS

# Maps and lists inside one another; an openpi observation needs 3 (a map of maps of arrays).
MAX_DEPTH = 32


def _encode(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        arr = wire_array(obj, "array")
        return {b"__ndarray__": True, b"data": arr.tobytes(), b"dtype": arr.dtype.str, b"shape": arr.shape}
    if isinstance(obj, np.generic):
        value = wire_array(obj, "numpy scalar")
        return {b"__npgeneric__": True, b"data": value.item(), b"dtype": value.dtype.str}
    return obj


def _array(obj: dict) -> np.ndarray:
    dtype, shape, nbytes = array_spec(obj.get(b"dtype"), obj.get(b"shape"), "ndarray", "bad_array")
    data = obj.get(b"data")
    if not isinstance(data, bytes) or len(data) != nbytes:
        raise ProtocolError(
            f"ndarray ({dtype.str} {shape}) needs {nbytes} bytes of data, got {describe(data)}", "bad_array"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)  # read-only: a view over the message's bytes


def _scalar(obj: dict) -> np.generic:
    dtype, _, _ = array_spec(obj.get(b"dtype"), [], "numpy scalar", "bad_array")
    data = obj.get(b"data")
    if dtype.kind == "b":
        fits = isinstance(data, bool)
    elif dtype.kind in "iu":
        info = np.iinfo(dtype)
        fits = isinstance(data, int) and not isinstance(data, bool) and info.min <= data <= info.max
    else:  # msgpack's integers (at most 64 bits) and floats convert to float exactly or nearly
        number = float(data) if isinstance(data, int | float) and not isinstance(data, bool) else None
        fits = number is not None and (not math.isfinite(number) or abs(number) <= float(np.finfo(dtype).max))
    if not fits:
        raise ProtocolError(f"numpy scalar of dtype {dtype.str} cannot hold {describe(data)}", "bad_array")
    return dtype.type(data)


def _decode(obj: dict) -> Any:
    if b"__ndarray__" in obj:
        return _array(obj)
    if b"__npgeneric__" in obj:
        return _scalar(obj)
    return obj


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack extension type {code} is not part of openpi's encoding", "bad_message")


def _check_depth(value: Any) -> None:
    """Raises if maps and lists nest deeper than `MAX_DEPTH` (iteratively: no recursion limit)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > MAX_DEPTH:
            raise ProtocolError(f"the message nests maps and lists more than {MAX_DEPTH} deep", "bad_message")
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))


def packb(obj: Any) -> bytes:
    return msgpack.packb(obj, default=_encode, use_bin_type=True)


def unpackb(data: bytes) -> Any:
    """The message's value: maps, lists, scalars, strings, bytes, read-only ndarrays and numpy
    scalars of the allowed dtypes (`codec.DTYPES`); anything else raises `ProtocolError`."""
    try:
        value = msgpack.unpackb(data, object_hook=_decode, ext_hook=_refuse_ext, raw=False, strict_map_key=False)
    except ProtocolError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise ProtocolError(f"message is not valid msgpack: {e}", "bad_message") from None
    _check_depth(value)
    return value


# The observation keys of real-time chunking: the leftover in the layout's action units, its options.
RTC_KEYS = (PREV_ACTIONS, *GUIDANCE_OPTIONS, RETURN_MODEL_ACTIONS)


def pop_guidance(obs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], np.ndarray | None]:
    """(the observation without `RTC_KEYS`, their options as plain values, `prev_actions` or None).

    openpi clients send numbers as numpy scalars: an option's scalar becomes its Python value, so
    `messages.parse_guidance` checks it like any other wire's; `prev_actions` must be an array."""
    rest = {k: v for k, v in obs.items() if k not in RTC_KEYS}
    options = {k: obs[k].item() if isinstance(obs[k], np.generic) else obs[k] for k in RTC_KEYS if k in obs}
    prev = options.pop(PREV_ACTIONS, None)
    if prev is not None and not isinstance(prev, np.ndarray):
        raise BadRequest(f"{PREV_ACTIONS} must be an ndarray (n, action dim), got {describe(prev)}")
    return rest, options, prev
