"""Request and reply vocabulary shared by every transport (ZMQ frames, JSON WebSocket).

The model's options and observation are `policy.request`'s (spelled out once, imported without
JAX); a transport adds the envelope: the request type, its id, the robot, the prompt and the
refresh interval. Option fields and defaults are the JSON API's. A `subtask_refresh_interval` that
is absent leaves the refresh as it is; `None` clears it.

Every value from the wire is checked here before it becomes part of a `Request`: its type, then
its size or range, with a `BadRequest` naming the field. Ranges that depend on the model (cameras,
image resolution, state length, decoding steps) are the engine's; the bounds here are the ones any
model shares, and they make every later conversion safe (no `OverflowError` from `float()` of a
huge integer, no infinite temperature, no lone surrogate reaching the tokenizer).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Final

import numpy as np

from policy.request import OPTION_NAMES, Observation, Options
from transport.codec import MAX_ID_CHARS, is_request_id
from transport.errors import BadRequest, ProtocolError, describe

# Request types and their reply types. `bye` ends the robot's session (its refresh included).
INFER, SUBTASK, REFRESH, PING, BYE = "infer", "subtask", "refresh", "ping", "bye"
REPLY_TYPE: Final = {INFER: "result", SUBTASK: "subtask_result", REFRESH: "refresh_ack", PING: "pong", BYE: "bye_ack"}
ERROR = "error"

IMAGE_PREFIX = "image/"
STATE = "state"
ACTIONS = "actions"
PROMPT = "high_level_prompt"
REFRESH_INTERVAL = "subtask_refresh_interval"
WIRE_OPTIONS: Final = (PROMPT, *OPTION_NAMES, REFRESH_INTERVAL)
RESERVED_PREFIX = "@"  # robot names of the server's own gateways

# Bounds every model shares (docs/protocol.md lists them).
MAX_PROMPT_BYTES = 4096  # each of high_level_prompt and low_level_prompt, UTF-8
MAX_ROBOT_CHARS = 256
MAX_CAMERAS = 8
MAX_CAMERA_CHARS = 64
MAX_IMAGE_SIDE = 4096  # pixels, height and width
MAX_STATE_DIM = 256
MAX_REFRESH_INTERVAL_S = 3600.0
MAX_DECODING_STEPS = 2**31 - 1  # a size bound; the engine's own limit is far lower
_FLOAT32_MAX = float(np.finfo(np.float32).max)


class _Keep:
    """The refresh interval was not mentioned: leave it as it is."""

    def __repr__(self) -> str:
        return "KEEP"


KEEP: Final = _Keep()
RefreshInterval = float | _Keep | None  # seconds, KEEP (leave it as it is) or None (clear it)


@dataclasses.dataclass(frozen=True)
class Request:
    """One request as a transport received it; `prompt` None keeps the session's prompt."""

    type: str
    id: int | str | None
    robot: str
    prompt: str | None = None
    options: Options = dataclasses.field(default_factory=Options)
    refresh_interval: RefreshInterval = KEEP
    observation: Observation | None = None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def finite_number(value: Any) -> float | None:
    """`value` as a float if it is a finite number (not a bool), else None. JSON's `1e400` arrives
    as inf and a 400-digit integer would overflow `float()`: both give None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if _is_int(value):
        try:
            return float(value)
        except OverflowError:
            return None
    return None


def check_text(value: Any, field: str, max_bytes: int) -> str:
    """`value` if it is a string of valid Unicode of at most `max_bytes` UTF-8 bytes.

    The character count is checked before encoding, so an oversize string costs nothing; a lone
    surrogate (valid in a JSON `\\ud800` escape, not in Unicode) is refused here rather than failing
    later in the tokenizer or in a reply."""
    if not isinstance(value, str):
        raise BadRequest(f"{field} must be a string, got {describe(value)}")
    if len(value) > max_bytes:
        raise BadRequest(f"{field} is {len(value)} characters, more than {max_bytes} bytes")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise BadRequest(
            f"{field} is not valid Unicode: lone surrogate U+{ord(value[e.start]):04X} at index {e.start}"
        ) from None
    if size > max_bytes:
        raise BadRequest(f"{field} is {size} bytes in UTF-8, more than {max_bytes}")
    return value


def _int_field(d: Mapping[str, Any], key: str, default: int | None, lo: int, hi: int) -> int | None:
    value = d.get(key, default)
    if value is None and default is None:
        return None
    if not _is_int(value) or not lo <= value <= hi:
        raise BadRequest(f"{key} must be an integer in {lo}..{hi}, got {describe(value)}")
    return value


def parse_options(d: Any) -> tuple[str | None, Options, RefreshInterval]:
    """(prompt, options, refresh interval) from a decoded map, each field type- and size-checked;
    unknown fields are rejected."""
    if d is None:
        d = {}
    if not isinstance(d, Mapping):
        raise BadRequest(f"options must be a map, got {describe(d)}")
    for key in d:
        if not isinstance(key, str):
            raise BadRequest(f"option names must be strings, got {describe(key)}")
        if key not in WIRE_OPTIONS:
            raise BadRequest(f"unknown option {describe(key)}; known options: {sorted(WIRE_OPTIONS)}")
    prompt = d.get(PROMPT)
    if prompt is not None:
        prompt = check_text(prompt, PROMPT, MAX_PROMPT_BYTES)
    low = d.get("low_level_prompt")
    if low is not None:
        low = check_text(low, "low_level_prompt", MAX_PROMPT_BYTES)
    generate = d.get("generate_subtask", True)
    if not isinstance(generate, bool):
        raise BadRequest(f"generate_subtask must be true or false, got {describe(generate)}")
    raw_temperature = d.get("temperature", 0.1)
    temperature = finite_number(raw_temperature)
    if temperature is None or not 0 <= temperature <= _FLOAT32_MAX:
        raise BadRequest(f"temperature must be a number in 0..{_FLOAT32_MAX:.4g}, got {describe(raw_temperature)}")
    interval = d.get(REFRESH_INTERVAL, KEEP)
    if interval is not KEEP and interval is not None:
        seconds = finite_number(interval)
        if seconds is None or not 0 < seconds <= MAX_REFRESH_INTERVAL_S:
            raise BadRequest(
                f"{REFRESH_INTERVAL} must be a number of seconds in (0, {MAX_REFRESH_INTERVAL_S:g}] "
                f"or null (clears it), got {describe(interval)}"
            )
        interval = seconds
    options = Options(
        generate_subtask=generate,
        low_level_prompt=low,
        max_decoding_steps=_int_field(d, "max_decoding_steps", 25, 0, MAX_DECODING_STEPS),
        temperature=temperature,
        seed=_int_field(d, "seed", None, 0, 2**64 - 1),
    )
    return prompt, options, interval


def build_request(
    header: Mapping[str, Any], arrays: Mapping[str, np.ndarray], default_robot: str, internal: bool = False
) -> Request:
    """The `Request` of a decoded ZMQ message (`codec.decode`'s header and arrays).

    `default_robot` names a robot that sent no `robot` (the peer identity in hex); robot names
    starting with `RESERVED_PREFIX` are accepted only from the server's own gateways (`internal`).
    """
    kind = header.get("type")
    if not isinstance(kind, str) or kind not in REPLY_TYPE:
        raise ProtocolError(f"unknown message type {describe(kind)}; known: {sorted(REPLY_TYPE)}", "unknown_type")
    request_id = header.get("id")
    if not is_request_id(request_id):
        raise BadRequest(
            f"id must be an integer or a string of at most {MAX_ID_CHARS} characters, got {describe(request_id)}"
        )
    robot = header.get("robot")
    if robot is None:
        robot = default_robot
    if not isinstance(robot, str) or not 0 < len(robot) <= MAX_ROBOT_CHARS:
        raise BadRequest(f"robot must be a string of 1 to {MAX_ROBOT_CHARS} characters, got {describe(robot)}")
    if robot.startswith(RESERVED_PREFIX) and not internal:
        raise BadRequest(f"robot names starting with {RESERVED_PREFIX!r} are reserved for the server")
    prompt, options, interval = parse_options(header.get("options"))
    return Request(
        type=kind,
        id=request_id,
        robot=robot,
        prompt=prompt,
        options=options,
        refresh_interval=interval,
        observation=split_observation(arrays, header.get("ts")),
    )


def check_camera(name: Any) -> str:
    if not isinstance(name, str) or not 0 < len(name) <= MAX_CAMERA_CHARS:
        raise BadRequest(f"camera names must be strings of 1 to {MAX_CAMERA_CHARS} characters, got {describe(name)}")
    return check_text(name, "camera name", 4 * MAX_CAMERA_CHARS)


def check_image(name: str, arr: np.ndarray) -> np.ndarray:
    """`arr` if it is an H x W x 3 uint8 image with 1 <= H, W <= `MAX_IMAGE_SIDE`."""
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise BadRequest(f"image {name!r} must be H x W x 3 uint8, got {arr.dtype} {arr.shape}")
    if not (0 < arr.shape[0] <= MAX_IMAGE_SIDE and 0 < arr.shape[1] <= MAX_IMAGE_SIDE):
        raise BadRequest(f"image {name!r} must be 1..{MAX_IMAGE_SIDE} pixels each way, got {arr.shape[:2]}")
    return arr


def check_state(arr: np.ndarray) -> np.ndarray:
    """`arr` if it is a 1-D state of 1..`MAX_STATE_DIM` numbers that float32 holds (no NaN or inf)."""
    if arr.ndim != 1 or not 0 < arr.size <= MAX_STATE_DIM or arr.dtype.kind not in "iuf":
        raise BadRequest(f"state must be 1..{MAX_STATE_DIM} numbers, got {arr.dtype} {arr.shape}")
    if arr.dtype.kind != "f":
        return arr
    # float16 and float32 need only be finite; float64 must also fit float32, which the model computes in.
    fits = np.isfinite(arr) if arr.dtype.itemsize <= 4 else np.abs(arr) <= _FLOAT32_MAX
    if not bool(np.all(fits)):
        raise BadRequest(f"state must hold finite numbers within float32's range (|x| <= {_FLOAT32_MAX:.4g})")
    return arr


def split_observation(arrays: Mapping[str, np.ndarray], timestamp: Any) -> Observation | None:
    """`image/<camera>` and `state` arrays into an `Observation`, each checked; any other name is
    an error."""
    if not arrays:
        return None
    images, state = {}, None
    for name, arr in arrays.items():
        if name.startswith(IMAGE_PREFIX):
            camera = check_camera(name[len(IMAGE_PREFIX) :])
            images[camera] = check_image(camera, arr)
        elif name == STATE:
            state = check_state(arr)
        else:
            raise BadRequest(f"unexpected array {name!r}; send images as 'image/<camera>' and the state as 'state'")
    if len(images) > MAX_CAMERAS:
        raise BadRequest(f"{len(images)} images, more than {MAX_CAMERAS} cameras")
    ts = None
    if timestamp is not None:
        ts = finite_number(timestamp)
        if ts is None:
            raise BadRequest(f"ts must be a finite number (seconds), got {describe(timestamp)}")
    return Observation(images=images, state=state, timestamp=ts)


def observation_arrays(obs: Observation) -> dict[str, np.ndarray]:
    arrays = {IMAGE_PREFIX + k: v for k, v in obs.images.items()}
    if obs.state is not None:
        arrays[STATE] = np.asarray(obs.state, np.float32)
    return arrays


def options_to_wire(
    prompt: str | None, options: Options | None, refresh_interval: RefreshInterval = KEEP
) -> dict[str, Any]:
    """The wire map of a request's prompt, options and refresh interval (absent ones left out)."""
    # Options holds scalars only: a shallow dict (`dataclasses.asdict` deep-copies, on every request).
    out: dict[str, Any] = {} if options is None else {name: getattr(options, name) for name in OPTION_NAMES}
    if prompt is not None:
        out[PROMPT] = prompt
    if refresh_interval is not KEEP:
        out[REFRESH_INTERVAL] = refresh_interval
    return out
