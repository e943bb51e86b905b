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

Nothing is built before the message's shape is known to be small: msgpack makes a Python object of
30 to 70 bytes for every item, from as little as one byte of input (an empty map is the byte 0x80),
so 8 MB of empty maps took a gateway from 44 MB to 1.2 GB and 8 s of CPU holding the GIL. A
pre-scan (`_prescan`) walks the item headers first, skipping str and bin payloads by their length,
and refuses the message as soon as it passes `MAX_ITEMS` items or `MAX_DEPTH` levels, or holds an
extension type; what msgpack then builds is at most `MAX_ITEMS` objects beside the payloads.

Real-time chunking rides in the observation as optional keys (`RTC_KEYS`): `pop_guidance` takes
them out before the layout reads the rest.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import msgpack
import numpy as np

from transport.codec import array_spec, wire_array
from transport.errors import BadRequest, ProtocolError, describe
from transport.messages import GUIDANCE_OPTIONS, PREV_ACTIONS, RETURN_MODEL_ACTIONS

# Maps and lists inside one another; an openpi observation needs 3 (a map of maps of arrays).
MAX_DEPTH = 32
# Maps, arrays, keys and values in all. An observation holds about a hundred: a map of a dozen keys,
# each an ndarray map of 4 entries with a shape list, or a string or a scalar.
MAX_ITEMS = 4096

# The msgpack headers by first byte, beyond the fix- ranges: bytes of payload that follow
# (nil, bool, numbers), bytes of a length that follows (str, bin: then that many bytes), or bytes
# of a count that follows and items per counted entry (arrays, maps). Bytes in none of these:
# 0xC1 (never used, left for msgpack to refuse) and the extension types.
_PAYLOAD = {0xC0: 0, 0xC2: 0, 0xC3: 0, 0xCA: 4, 0xCB: 8} | {0xCC + i: 1 << i for i in range(4)}
_PAYLOAD |= {0xD0 + i: 1 << i for i in range(4)}
_LENGTH = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4}
_COUNT = {0xDC: (2, 1), 0xDD: (4, 1), 0xDE: (2, 2), 0xDF: (4, 2)}
_EXTENSIONS = frozenset((0xC7, 0xC8, 0xC9, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8))
_UINT = {1: struct.Struct(">B"), 2: struct.Struct(">H"), 4: struct.Struct(">I")}


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


def _prescan(data: bytes) -> None:
    """Walks the headers of the message's first item and everything in it, building nothing, and
    raises `ProtocolError` (`bad_message`) at the first item past `MAX_ITEMS`, the first map or
    array deeper than `MAX_DEPTH`, or an extension type. A count is checked when its header is read,
    so one array header announcing millions of items is refused before any of them is looked at.
    Every item read was announced by its map or array first, so no more than `MAX_ITEMS` are read.
    A message that ends early or holds the unused byte 0xC1 is left for msgpack to refuse."""
    pos, end = 0, len(data)
    announced = 1  # items announced so far (the first item, and every map's and array's count)
    pending = [1]  # items still to read at each open level
    while pending and pos < end:
        if not pending[-1]:
            pending.pop()
            continue
        pending[-1] -= 1
        head = data[pos]
        pos += 1
        if head < 0x80 or head >= 0xE0:  # fixints
            continue
        if head < 0xA0:  # fixmap, fixarray
            children = (head & 0x0F) * (2 if head < 0x90 else 1)
        elif head < 0xC0:  # fixstr
            pos += head & 0x1F
            continue
        elif head in _PAYLOAD:
            pos += _PAYLOAD[head]
            continue
        elif head in _LENGTH:
            size = _LENGTH[head]
            if pos + size > end:
                return
            pos += size + _UINT[size].unpack_from(data, pos)[0]
            continue
        elif head in _COUNT:
            size, per_entry = _COUNT[head]
            if pos + size > end:
                return
            children = _UINT[size].unpack_from(data, pos)[0] * per_entry
            pos += size
        elif head in _EXTENSIONS:
            raise ProtocolError("msgpack extension types are not part of openpi's encoding", "bad_message")
        else:
            return
        if len(pending) > MAX_DEPTH:
            raise ProtocolError(f"the message nests maps and lists more than {MAX_DEPTH} deep", "bad_message")
        announced += children
        if announced > MAX_ITEMS:
            raise ProtocolError(f"the message holds more than {MAX_ITEMS} maps, arrays, keys and values", "bad_message")
        pending.append(children)


def packb(obj: Any) -> bytes:
    return msgpack.packb(obj, default=_encode, use_bin_type=True)


def unpackb(data: bytes) -> Any:
    """The message's value: maps, lists, scalars, strings, bytes, read-only ndarrays and numpy
    scalars of the allowed dtypes (`codec.DTYPES`); anything else raises `ProtocolError`."""
    if not isinstance(data, bytes):
        raise ProtocolError(f"a msgpack message is bytes, got {describe(data)}", "bad_message")
    _prescan(data)
    try:
        return msgpack.unpackb(data, object_hook=_decode, raw=False, strict_map_key=False)
    except ProtocolError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise ProtocolError(f"message is not valid msgpack: {e}", "bad_message") from None


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
