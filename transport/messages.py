"""Request and reply vocabulary shared by every transport (ZMQ frames, JSON WebSocket).

Options carry the same fields and defaults as the JSON API (`shared/spec/json_api.md`). A
`subtask_refresh_interval` that is absent leaves the refresh as it is; `None` clears it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Final

import numpy as np

from transport.errors import BadRequest

# Request types and their reply types.
INFER, SUBTASK, REFRESH, PING = "infer", "subtask", "refresh", "ping"
REPLY_TYPE: Final = {INFER: "result", SUBTASK: "subtask_result", REFRESH: "refresh_ack", PING: "pong"}
ERROR = "error"

IMAGE_PREFIX = "image/"
STATE = "state"
ACTIONS = "actions"


class _Keep:
    """The refresh interval was not mentioned: leave it as it is."""

    def __repr__(self) -> str:
        return "KEEP"


KEEP: Final = _Keep()


@dataclasses.dataclass(frozen=True)
class Options:
    high_level_prompt: str | None = None
    low_level_prompt: str | None = None
    generate_subtask: bool = True
    max_decoding_steps: int = 25
    temperature: float = 0.1
    seed: int | None = None
    subtask_refresh_interval: float | _Keep | None = KEEP


@dataclasses.dataclass(frozen=True)
class Observation:
    """What a robot saw: camera name -> HxWx3 uint8, its un-normalized state, when it saw it."""

    images: Mapping[str, np.ndarray]
    state: np.ndarray | None = None
    timestamp: float | None = None


@dataclasses.dataclass(frozen=True)
class Request:
    type: str
    id: int | str | None
    robot: str
    options: Options
    observation: Observation | None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _field(d: Mapping[str, Any], key: str, default: Any, check, what: str, nullable: bool = False) -> Any:
    if key not in d or (nullable and d[key] is None):
        return d.get(key, default)
    value = d[key]
    if not check(value):
        raise BadRequest(f"{key} must be {what}, got {value!r}")
    return value


def parse_options(d: Any) -> Options:
    """Options from a decoded map, each field type-checked; unknown fields are rejected."""
    if d is None:
        d = {}
    if not isinstance(d, Mapping):
        raise BadRequest(f"options must be a map, got {type(d).__name__}")
    known = {f.name for f in dataclasses.fields(Options)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise BadRequest(f"unknown option {unknown[0]!r}; known options: {sorted(known)}")
    interval = d.get("subtask_refresh_interval", KEEP)
    if interval is not KEEP and interval is not None:
        if not _is_number(interval):
            raise BadRequest(f"subtask_refresh_interval must be a number of seconds or null, got {interval!r}")
        if interval <= 0:
            raise BadRequest(f"subtask_refresh_interval must be > 0 seconds (null clears it), got {interval}")
        interval = float(interval)
    return Options(
        high_level_prompt=_field(d, "high_level_prompt", None, lambda v: isinstance(v, str), "a string"),
        low_level_prompt=_field(d, "low_level_prompt", None, lambda v: isinstance(v, str), "a string", True),
        generate_subtask=_field(d, "generate_subtask", True, lambda v: isinstance(v, bool), "true or false"),
        max_decoding_steps=_field(d, "max_decoding_steps", 25, _is_int, "an integer"),
        temperature=float(_field(d, "temperature", 0.1, _is_number, "a finite number")),
        seed=_field(d, "seed", None, _is_int, "an integer", True),
        subtask_refresh_interval=interval,
    )


def split_observation(arrays: Mapping[str, np.ndarray], timestamp: Any) -> Observation | None:
    """`image/<camera>` and `state` arrays into an `Observation`; any other name is an error."""
    if not arrays:
        return None
    images, state = {}, None
    for name, arr in arrays.items():
        if name.startswith(IMAGE_PREFIX) and len(name) > len(IMAGE_PREFIX):
            images[name[len(IMAGE_PREFIX) :]] = arr
        elif name == STATE:
            state = arr
        else:
            raise BadRequest(f"unexpected array {name!r}; send images as 'image/<camera>' and the state as 'state'")
    if timestamp is not None and not _is_number(timestamp):
        raise BadRequest(f"ts must be a number (seconds), got {timestamp!r}")
    return Observation(images=images, state=state, timestamp=None if timestamp is None else float(timestamp))


def observation_arrays(obs: Observation) -> dict[str, np.ndarray]:
    arrays = {IMAGE_PREFIX + k: v for k, v in obs.images.items()}
    if obs.state is not None:
        arrays[STATE] = np.asarray(obs.state, np.float32)
    return arrays


def options_to_wire(options: Options) -> dict[str, Any]:
    out = {f.name: getattr(options, f.name) for f in dataclasses.fields(Options)}
    return {k: v for k, v in out.items() if v is not KEEP and not (k == "high_level_prompt" and v is None)}
