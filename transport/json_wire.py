"""The JSON API's wire side: parsing a text frame into `Request`s, and the reply maps.

Pure functions, no sockets, so the JSON gateway can run them wherever its CPU work belongs. Any
input gives either requests or a `TransportError` with a code: `oversize` (checked first, before
parsing), `bad_request` (more objects, lists or strings than a request can hold, counted before
parsing; a field missing, of the wrong type or out of range, named in the message) or
`invalid_json` (not JSON, `NaN`/`Infinity`, a number of more digits than Python converts, nesting
deeper than the parser's recursion limit). Cheap checks come first: the counts, then every field's
type and size, every image's dimensions and every batch item's, before any image is converted.

The counts exist because `json.loads` builds a Python object for every value: `[{},{},...]` cost 25
bytes of memory per byte of text (100 MB of it took a gateway to 2.6 GB, holding the GIL for 9 s).
`JsonLimits` counts `{`, `"`, `[` and `,` first (C speed, nothing built) against what a request of
the server can hold, so what `json.loads` may then build is at most about what an image of nested
lists of the same length costs (a pixel `[0,0,0],` is about 13 bytes per character).

Replies are written by `dumps`, which refuses NaN and infinity (Python writes `NaN`, which is not
JSON), so a non-finite number becomes an error reply instead of a frame no JSON parser reads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np

from policy.request import ChunkGuidance, Observation, Options
from transport.errors import BadRequest, ProtocolError, describe
from transport.messages import (
    ACTIONS,
    INFER,
    MAX_ACTION_DIM,
    MAX_CAMERA_CHARS,
    MAX_CAMERAS,
    MAX_CHUNK_STEPS,
    MAX_IMAGE_SIDE,
    MAX_PROMPT_BYTES,
    MAX_STATE_DIM,
    MODEL_ACTIONS,
    PREV_ACTIONS,
    WIRE_OPTIONS,
    RefreshInterval,
    Request,
    check_camera,
    check_prev_actions,
    check_state,
    finite_number,
    parse_guidance,
    parse_options,
)

REFRESH_FIELDS = ("type", "subtask", "subtask_tokens", "refresh_count", "timestamp")
_RESPONSE_FIELDS = ("subtask", "subtask_tokens", "state")
_TIMING_FIELDS = ("total_ms", "action_ms", "subtask_ms")  # the JSON API's; ZMQ replies carry queue_ms too


# What one request holds, for `JsonLimits`. Its strings (two prompts, camera names, option names
# and short option values) may contain any character that is counted; outside them a request opens
# two objects (itself and `images`), at most `_STRINGS` strings, and lists: an image's pixels, each
# `[r,g,b]` followed by a comma unless it ends its image (rows are separated by commas too), and at
# most `_LISTS` others (each image's outer list and rows, state, prev_actions and its rows).
_STRING_CHARS = 2 * MAX_PROMPT_BYTES + MAX_CAMERAS * MAX_CAMERA_CHARS + 256
_STRINGS = 3 + len(WIRE_OPTIONS) + MAX_CAMERAS + 3  # keys (images, state, prev_actions, options, cameras), values
_LISTS = MAX_CAMERAS * (1 + MAX_IMAGE_SIDE) + 2 + MAX_CHUNK_STEPS
_COMMAS_PER_PIXEL = 3


@dataclasses.dataclass(frozen=True)
class JsonLimits:
    """How many objects, strings and lists a message of a server taking `max_batch` requests can
    hold; `check` counts their opening characters (and the commas a pixel list brings) before
    anything is parsed, so that what may be built is at most what pixels cost: `[0,0,0],`, a
    list of 3 in 8 characters, is about 13 bytes of memory per character, as is any other shape
    that passes (`-9,`, an integer Python does not cache, is one)."""

    max_batch: int = 8

    def check(self, message: str) -> None:
        n = self.max_batch
        self._at_most(message, "objects", "{", 1 + n * (2 + _STRING_CHARS), "")
        self._at_most(message, "strings", '"', 2 + n * (2 * _STRINGS + _STRING_CHARS), "")
        commas = message.count(",")
        lists = 1 + n * (_LISTS + _STRING_CHARS) + commas // _COMMAS_PER_PIXEL
        self._at_most(message, "lists", "[", lists, f" and {commas} commas")

    def _at_most(self, message: str, what: str, char: str, limit: int, given: str) -> None:
        count = message.count(char)
        if count > limit:
            raise BadRequest(
                f"the message opens {count} {what} ({char!r}), more than the {limit} that a message of at most "
                f"{self.max_batch} requests{given} can hold"
            )


DEFAULT_LIMITS = JsonLimits()


class _Constant(ValueError):
    """`NaN`, `Infinity` or `-Infinity`: Python's json reads them, JSON has no such literals."""


def _refuse_constant(name: str) -> Any:
    raise _Constant(name)


def loads(message: str | bytes, max_bytes: int | None = None, limits: JsonLimits = DEFAULT_LIMITS) -> Any:
    """The JSON value of a text frame; its length is checked against `max_bytes`, and its objects,
    strings and lists are counted against `limits`, before parsing."""
    if not isinstance(message, str):
        raise BadRequest("the JSON API takes text frames; got a binary frame")
    if max_bytes is not None and len(message) > max_bytes:
        raise ProtocolError(
            f"message is {len(message)} characters, more than the server's limit of {max_bytes}", "oversize"
        )
    limits.check(message)
    try:
        return json.loads(message, parse_constant=_refuse_constant)
    except RecursionError:
        raise ProtocolError(
            "the message is not valid JSON: arrays and objects nest too deeply", "invalid_json"
        ) from None
    except _Constant as e:
        raise ProtocolError(f"the message is not valid JSON: {e} is not a JSON number", "invalid_json") from None
    except json.JSONDecodeError as e:
        raise ProtocolError(f"the message is not valid JSON: {e}", "invalid_json") from None
    except ValueError:  # the only other one: an integer beyond Python's digit limit
        raise ProtocolError(
            f"the message holds a number of more than {sys.get_int_max_str_digits()} digits", "invalid_json"
        ) from None


def _image_dims(name: str, value: Any) -> tuple[int, int]:
    """(H, W) from the outer lists alone, so a huge or malformed image is refused unconverted."""
    row = value[0] if isinstance(value, list) and value else None
    pixel = row[0] if isinstance(row, list) and row else None
    if not (
        isinstance(value, list)
        and len(value) <= MAX_IMAGE_SIDE
        and isinstance(row, list)
        and len(row) <= MAX_IMAGE_SIDE
        and isinstance(pixel, list)
        and len(pixel) == 3
    ):
        raise BadRequest(f"image {name!r} must be H x W x 3 nested lists with 1 <= H, W <= {MAX_IMAGE_SIDE}")
    return len(value), len(row)


def parse_image(name: str, value: Any) -> np.ndarray:
    """An H x W x 3 nested list of integers 0..255 as a uint8 array, or a precise error.

    numpy converts the lists in C and infers their type; anything but integers (floats, strings,
    maps, nulls, integers beyond 64 bits) gives a non-integer dtype and is refused, as is a
    ragged or deeper list. (numpy reads a `true` among integers as 1.)
    """
    height, width = _image_dims(name, value)
    try:
        arr = np.array(value)
    except (ValueError, TypeError, OverflowError):
        raise BadRequest(f"image {name!r} is a ragged list; expected {height} x {width} x 3") from None
    if arr.shape != (height, width, 3):
        raise BadRequest(f"image {name!r} must be H x W x 3 nested lists, got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise BadRequest(f"image {name!r} must hold integers 0..255, got {arr.dtype}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi > 255:
        raise BadRequest(f"image {name!r} has values outside 0..255 ({lo}..{hi})")
    return arr.astype(np.uint8)


def parse_state(value: Any) -> np.ndarray | None:
    """A list of 1..`MAX_STATE_DIM` finite numbers as float32 (null: no state)."""
    if value is None:
        return None
    if not isinstance(value, list) or not 0 < len(value) <= MAX_STATE_DIM:
        raise BadRequest(f"state must be a list of 1..{MAX_STATE_DIM} numbers, got {describe(value)}")
    numbers = [finite_number(v) for v in value]
    for i, x in enumerate(numbers):
        if x is None:
            raise BadRequest(f"state[{i}] must be a finite number, got {describe(value[i])}")
    return check_state(np.array(numbers, np.float64)).astype(np.float32)


def parse_prev_actions(value: Any) -> np.ndarray | None:
    """An n x action dim list of lists of finite numbers as float64 (absent or null: none). The
    list sizes are checked before any number is read."""
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or not 0 < len(value) <= MAX_CHUNK_STEPS
        or not isinstance(value[0], list)
        or not 0 < len(value[0]) <= MAX_ACTION_DIM
        or not all(isinstance(row, list) and len(row) == len(value[0]) for row in value)
    ):
        raise BadRequest(
            f"{PREV_ACTIONS} must be a list of 1..{MAX_CHUNK_STEPS} rows of 1..{MAX_ACTION_DIM} numbers, all rows "
            f"of one length, got {describe(value)}"
        )
    rows = []
    for i, row in enumerate(value):
        numbers = [finite_number(v) for v in row]
        for j, x in enumerate(numbers):
            if x is None:
                raise BadRequest(f"{PREV_ACTIONS}[{i}][{j}] must be a finite number, got {describe(row[j])}")
        rows.append(numbers)
    return check_prev_actions(np.array(rows, np.float64))


@dataclasses.dataclass(frozen=True)
class _Checked:
    """A request whose fields passed every cheap check; its images are not yet converted."""

    prompt: str
    options: Options
    interval: RefreshInterval
    images: dict[str, Any]
    state: np.ndarray | None
    guidance: ChunkGuidance | None
    return_model_actions: bool


@contextlib.contextmanager
def _item(where: str | None) -> Iterator[None]:
    """Prefixes a `BadRequest` with the batch item it is about (`batch[2]: ...`)."""
    try:
        yield
    except BadRequest as e:
        if where is None:
            raise
        raise BadRequest(f"{where}: {e.message}") from None


def _check(item: Any, where: str | None) -> _Checked:
    with _item(where):
        if not isinstance(item, dict):
            raise BadRequest(f"a request must be a JSON object, got {describe(item)}")
        fields = dict(item)
        images = fields.pop("images", None)
        state = fields.pop("state", None)
        prev_actions = parse_prev_actions(fields.pop(PREV_ACTIONS, None))
        prompt, options, interval = parse_options(fields)
        guidance, return_model_actions = parse_guidance(fields, prev_actions)
        if not prompt:
            raise BadRequest("high_level_prompt is required (a non-empty string)")
        if not isinstance(images, dict) or not images:
            raise BadRequest("images is required: an object of camera name -> H x W x 3 lists")
        if len(images) > MAX_CAMERAS:
            raise BadRequest(f"images has {len(images)} cameras, more than {MAX_CAMERAS}")
        for name, value in images.items():
            _image_dims(check_camera(name), value)
        return _Checked(prompt, options, interval, images, parse_state(state), guidance, return_model_actions)


def _build(checked: _Checked, key: str, where: str | None) -> Request:
    with _item(where):
        images = {name: parse_image(name, value) for name, value in checked.images.items()}
    observation = Observation(images=images, state=checked.state)
    return Request(
        INFER, None, key, checked.prompt, checked.options, checked.interval, observation, checked.guidance,
        checked.return_model_actions,
    )  # fmt: skip


def parse_request(item: Any, key: str) -> Request:
    """One request of session `key` from its JSON value."""
    return _build(_check(item, None), key, None)


def parse_batch(payload: Any, key: str, max_batch: int) -> list[Request]:
    """The requests of `{"batch": [...]}` (1..`max_batch` items); an error names the item
    (`batch[2]: ...`). Every item passes its cheap checks before any image is converted."""
    if not isinstance(payload, dict) or set(payload) != {"batch"}:
        raise BadRequest('a batch request is an object holding only "batch"')
    items = payload["batch"]
    if not isinstance(items, list) or not items:
        raise BadRequest("batch must be a non-empty list of requests")
    if len(items) > max_batch:
        raise BadRequest(f"batch has {len(items)} requests, more than {max_batch}")
    checked = [_check(item, f"batch[{i}]") for i, item in enumerate(items)]
    return [_build(c, key, f"batch[{i}]") for i, c in enumerate(checked)]


def response(data: dict[str, Any], total_ms: float) -> dict[str, Any]:
    """The JSON API's success reply to one request, from the service's reply `data` (with its
    `actions`, and `model_actions` when asked, as `AsyncPolicyClient.infer` gives them)."""
    out: dict[str, Any] = {"status": "success", ACTIONS: np.asarray(data[ACTIONS])[None].tolist()}
    if MODEL_ACTIONS in data:
        out[MODEL_ACTIONS] = np.asarray(data[MODEL_ACTIONS])[None].tolist()
    out.update({k: data.get(k) for k in _RESPONSE_FIELDS})
    timing = data.get("timing") or {}
    out["timing"] = {k: timing[k] for k in _TIMING_FIELDS if k in timing}
    out["server_timing"] = {"total_ms": total_ms}
    out["subtask_refresh_enabled"] = data.get("subtask_refresh_enabled", False)
    out["subtask_refresh_interval"] = data.get("subtask_refresh_interval")
    return out


def refresh_message(message: dict[str, Any]) -> dict[str, Any]:
    """The JSON API's refresh push from a published refresh (which carries more fields)."""
    return {k: message.get(k) for k in REFRESH_FIELDS}


def error(code: str, message: str) -> dict[str, Any]:
    return {"status": "error", "error": {"code": code, "message": message}}


def dumps(reply: dict[str, Any]) -> str:
    """A reply's JSON text; ValueError for NaN or infinity anywhere in it (JSON has neither)."""
    return json.dumps(reply, allow_nan=False)
