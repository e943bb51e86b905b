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

Real-time chunking travels as the array `prev_actions` (the robot's unexecuted leftover, robot
units) and the options `inference_delay`, `execute_horizon`, `rtc_schedule` and
`max_guidance_weight`, which become the request's `ChunkGuidance`; `return_model_actions` asks for
the chunk in model space too. They go with `infer` requests that carry their observation (the
leftover's row 0 is that observation's step); the model-dependent ranges (the horizon, the robot's
action width, d <= s <= horizon - d, the largest weight) are the engine's to check.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Final

import numpy as np

from policy.request import OPTION_NAMES, SCHEDULES, ChunkGuidance, Observation, Options
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
# Real-time chunking: the leftover array, its options, and the model-space chunk a reply may carry.
PREV_ACTIONS = "prev_actions"
MODEL_ACTIONS = "model_actions"
INFERENCE_DELAY = "inference_delay"
EXECUTE_HORIZON = "execute_horizon"
RTC_SCHEDULE = "rtc_schedule"
MAX_GUIDANCE_WEIGHT = "max_guidance_weight"
RETURN_MODEL_ACTIONS = "return_model_actions"
GUIDANCE_OPTIONS: Final = (INFERENCE_DELAY, EXECUTE_HORIZON, RTC_SCHEDULE, MAX_GUIDANCE_WEIGHT)
WIRE_OPTIONS: Final = (PROMPT, *OPTION_NAMES, REFRESH_INTERVAL, *GUIDANCE_OPTIONS, RETURN_MODEL_ACTIONS)
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
MAX_CHUNK_STEPS = 1024  # prev_actions rows, inference_delay, execute_horizon; the horizon is the engine's
MAX_ACTION_DIM = 256  # prev_actions columns; the robot's action width is the engine's
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
    guidance: ChunkGuidance | None = None
    return_model_actions: bool = False


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
    arrays = dict(arrays)
    prev_actions = arrays.pop(PREV_ACTIONS, None)
    observation = split_observation(arrays, header.get("ts"))
    guidance, return_model_actions = parse_guidance(header.get("options"), prev_actions)
    if kind != INFER and (guidance is not None or return_model_actions):
        raise BadRequest(f"{PREV_ACTIONS}, its options and {RETURN_MODEL_ACTIONS} go with infer requests only")
    if guidance is not None and observation is None:
        raise BadRequest(f"{PREV_ACTIONS} needs the observation it continues from, in the same request")
    return Request(
        type=kind,
        id=request_id,
        robot=robot,
        prompt=prompt,
        options=options,
        refresh_interval=interval,
        observation=observation,
        guidance=guidance,
        return_model_actions=return_model_actions,
    )


def parse_guidance(d: Mapping[str, Any] | None, prev_actions: np.ndarray | None) -> tuple[ChunkGuidance | None, bool]:
    """(guidance, return_model_actions) from a request's options (already checked by
    `parse_options`) and its `prev_actions` array (None: not sent).

    `inference_delay` and `execute_horizon` are required with `prev_actions` and refused without
    it, as are `rtc_schedule` and `max_guidance_weight`: an option that would be silently ignored
    is a client's mistake worth naming."""
    d = d or {}
    return_model_actions = d.get(RETURN_MODEL_ACTIONS, False)
    if not isinstance(return_model_actions, bool):
        raise BadRequest(f"{RETURN_MODEL_ACTIONS} must be true or false, got {describe(return_model_actions)}")
    if prev_actions is None:
        given = [k for k in GUIDANCE_OPTIONS if k in d]
        if given:
            raise BadRequest(f"{given[0]} needs {PREV_ACTIONS} (the leftover the new chunk continues)")
        return None, return_model_actions
    actions = check_prev_actions(prev_actions)
    steps = {}
    for key, lo in ((INFERENCE_DELAY, 0), (EXECUTE_HORIZON, 1)):
        if d.get(key) is None:
            raise BadRequest(f"{key} is required with {PREV_ACTIONS}")
        steps[key] = _int_field(d, key, None, lo, MAX_CHUNK_STEPS)
    extra: dict[str, Any] = {}
    if RTC_SCHEDULE in d:
        schedule = d[RTC_SCHEDULE]
        if not isinstance(schedule, str) or schedule not in SCHEDULES:
            raise BadRequest(f"{RTC_SCHEDULE} must be one of {list(SCHEDULES)}, got {describe(schedule)}")
        extra["schedule"] = schedule
    if MAX_GUIDANCE_WEIGHT in d:
        raw = d[MAX_GUIDANCE_WEIGHT]
        beta = finite_number(raw)
        if beta is None or not 0 <= beta <= _FLOAT32_MAX:
            raise BadRequest(f"{MAX_GUIDANCE_WEIGHT} must be a number in 0..{_FLOAT32_MAX:.4g}, got {describe(raw)}")
        extra["max_guidance_weight"] = beta
    guidance = ChunkGuidance(actions, steps[INFERENCE_DELAY], steps[EXECUTE_HORIZON], **extra)
    return guidance, return_model_actions


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


def _check_float32_range(arr: np.ndarray, field: str) -> np.ndarray:
    """`arr` (integers or floats) if every value is a finite number that float32 holds."""
    if arr.dtype.kind != "f":
        return arr
    # float16 and float32 need only be finite; float64 must also fit float32, which the model computes in.
    fits = np.isfinite(arr) if arr.dtype.itemsize <= 4 else np.abs(arr) <= _FLOAT32_MAX
    if not fits.all():  # the method: `np.all` costs a microsecond more per call
        raise BadRequest(f"{field} must hold finite numbers within float32's range (|x| <= {_FLOAT32_MAX:.4g})")
    return arr


def check_state(arr: np.ndarray) -> np.ndarray:
    """`arr` if it is a 1-D state of 1..`MAX_STATE_DIM` numbers that float32 holds (no NaN or inf)."""
    if arr.ndim != 1 or not 0 < arr.size <= MAX_STATE_DIM or arr.dtype.kind not in "iuf":
        raise BadRequest(f"state must be 1..{MAX_STATE_DIM} numbers, got {arr.dtype} {arr.shape}")
    return _check_float32_range(arr, STATE)


def check_prev_actions(arr: np.ndarray) -> np.ndarray:
    """`arr` if it is an (n, action dim) array of numbers that float32 holds, 1 <= n <=
    `MAX_CHUNK_STEPS` and 1 <= action dim <= `MAX_ACTION_DIM`."""
    if (
        arr.ndim != 2
        or not 0 < arr.shape[0] <= MAX_CHUNK_STEPS
        or not 0 < arr.shape[1] <= MAX_ACTION_DIM
        or arr.dtype.kind not in "iuf"
    ):
        raise BadRequest(
            f"{PREV_ACTIONS} must be (n, action dim) numbers with 1 <= n <= {MAX_CHUNK_STEPS} and "
            f"1 <= action dim <= {MAX_ACTION_DIM}, got {arr.dtype} {arr.shape}"
        )
    return _check_float32_range(arr, PREV_ACTIONS)


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


def guidance_to_wire(
    guidance: ChunkGuidance | None, return_model_actions: bool = False
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(options, arrays) that carry a request's guidance: `prev_actions` as float32 (the model's
    precision), its options, and `return_model_actions` when asked."""
    options: dict[str, Any] = {RETURN_MODEL_ACTIONS: True} if return_model_actions else {}
    if guidance is None:
        return options, {}
    options.update({
        INFERENCE_DELAY: int(guidance.inference_delay),
        EXECUTE_HORIZON: int(guidance.execute_horizon),
        RTC_SCHEDULE: guidance.schedule,
        MAX_GUIDANCE_WEIGHT: float(guidance.max_guidance_weight),
    })  # fmt: skip
    return options, {PREV_ACTIONS: np.asarray(guidance.prev_actions, np.float32)}


def client_guidance(
    prev_actions: np.ndarray | None,
    inference_delay: int | None,
    execute_horizon: int | None,
    rtc_schedule: str | None,
    max_guidance_weight: float | None,
) -> ChunkGuidance | None:
    """The guidance of a client's `infer` arguments (None without `prev_actions`); the server
    checks the values and names what is wrong."""
    if prev_actions is None:
        if (inference_delay, execute_horizon, rtc_schedule, max_guidance_weight) != (None,) * 4:
            raise ValueError("inference_delay, execute_horizon, rtc_schedule and max_guidance_weight need prev_actions")
        return None
    if inference_delay is None or execute_horizon is None:
        raise ValueError("prev_actions needs inference_delay and execute_horizon")
    extra: dict[str, Any] = {}
    if rtc_schedule is not None:
        extra["schedule"] = rtc_schedule
    if max_guidance_weight is not None:
        extra["max_guidance_weight"] = max_guidance_weight
    return ChunkGuidance(np.asarray(prev_actions), inference_delay, execute_horizon, **extra)
