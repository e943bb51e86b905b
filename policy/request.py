"""The one typed request that every transport builds and the service and the engine consume.

Plain dataclasses over numpy, no JAX: the robot side and the transports import this module (and
only this one from `policy`) without pulling in the model. Options are spelled out here once; a
new model input (real-time chunking's previous chunk, a guidance weight) is a field here and a
column in the engine's batch rows, nowhere else.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Literal

import numpy as np

# What a request asks the engine for: a subtask then actions ("infer"), or the subtask alone.
Kind = Literal["infer", "subtask"]
# Who is waiting: a robot's control loop ("action") or a periodic refresh nobody blocks on.
Priority = Literal["action", "refresh"]


@dataclasses.dataclass(frozen=True)
class Options:
    """Per-request model options, with the JSON API's defaults."""

    generate_subtask: bool = True
    low_level_prompt: str | None = None
    max_decoding_steps: int = 25
    temperature: float = 0.1
    seed: int | None = None


OPTION_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Options))

# Prefix-weight schedules of real-time chunking (Black, Galliker & Levine 2025): how the guidance
# weight falls from 1 after the first `inference_delay` steps to 0 at `horizon - execute_horizon`.
Schedule = Literal["exp", "linear", "ones", "zeros"]
SCHEDULES: tuple[str, ...] = ("exp", "linear", "ones", "zeros")


@dataclasses.dataclass(frozen=True)
class ChunkGuidance:
    """Real-time chunking: steer the new chunk to continue the one the robot is executing.

    `prev_actions` is the robot's unexecuted leftover, (n, robot action dim) in robot units, its
    row 0 scheduled for the same control step as the new chunk's row 0 (the step of the request's
    observation); the engine normalizes it and pads it to (horizon, model action dim) with the
    statistics it unnormalizes with. `inference_delay` (d) is how many steps the robot executes
    from the old chunk before the new one arrives; `execute_horizon` (s) how many it will execute
    from the new one before the next arrives; `max_guidance_weight` is beta, the clip on the
    guidance weight (0 turns guidance off).
    """

    prev_actions: np.ndarray
    inference_delay: int
    execute_horizon: int
    schedule: Schedule = "exp"
    max_guidance_weight: float = 5.0


@dataclasses.dataclass(frozen=True)
class Observation:
    """What a robot saw: camera name -> HxWx3 uint8, its un-normalized state, when it saw it."""

    images: Mapping[str, np.ndarray]
    state: np.ndarray | None = None
    timestamp: float | None = None


# Beyond this the guided velocity would dwarf the model's own: a client error, not a setting.
MAX_GUIDANCE_WEIGHT = 100.0
# The largest |value| of a leftover in model space. The model's actions live in about [-1, 1]
# (quantile-normalized; a few units z-scored), so this is 1000 times beyond any chunk it produced;
# leftovers far past it made the guided flow overflow float32 into NaN (from 1e19 on with the
# exact VJP, measured on the tiny model), and a chunk guided toward them means nothing anyway.
MAX_MODEL_SPACE_ACTION = 1000.0


def check_guidance(
    guidance: object,
    horizon: int,
    action_dim: int,
    to_model: Callable[[np.ndarray], np.ndarray] | None = None,
) -> None:
    """Real-time chunking's inputs against a model's horizon and robot action dim: the leftover
    (n, action_dim) with 1 <= n <= horizon, finite numbers, within MAX_MODEL_SPACE_ACTION in model
    space (`to_model` maps robot units there, as the engine's norm stats do; None: they are model
    space, as float32); 0 <= d and max(d, 1) <= s <= horizon - d, as the paper's evaluation sweeps them (so
    d <= horizon / 2); a known schedule; 0 <= beta <= MAX_GUIDANCE_WEIGHT. A `ValueError` names
    the field. Here, without JAX, so that a backend without a model checks exactly what the
    engine checks."""
    if not isinstance(guidance, ChunkGuidance):
        raise ValueError(f"guidance must be a ChunkGuidance, got {type(guidance).__name__}")
    try:  # an array or nested lists (as a JSON transport may pass them), like the state
        prev = np.asarray(guidance.prev_actions, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError("prev_actions must be an array of numbers") from None
    if prev.ndim != 2 or not 1 <= prev.shape[0] <= horizon or prev.shape[1] != action_dim:
        raise ValueError(
            f"prev_actions must be (n, {action_dim}) with 1 <= n <= {horizon} (the horizon), got shape {prev.shape}"
        )
    if not np.isfinite(prev).all():
        raise ValueError("prev_actions contains NaN or infinity")
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is what is looked for here
        model = prev.astype(np.float32) if to_model is None else np.asarray(to_model(prev))
    outside = ~(np.abs(model) <= MAX_MODEL_SPACE_ACTION)  # NaN and infinity included
    if outside.any():
        i, j = (int(k) for k in np.argwhere(outside)[0])
        raise ValueError(
            f"prev_actions[{i}][{j}] is {prev[i, j]:.6g}, {model[i, j]:.6g} in the model's normalized space: "
            f"beyond +-{MAX_MODEL_SPACE_ACTION:g}, far outside the range of the actions it produces"
        )
    d, s = guidance.inference_delay, guidance.execute_horizon
    for name, value in (("inference_delay", d), ("execute_horizon", s)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if not 0 <= d <= horizon // 2:
        raise ValueError(f"inference_delay must be in 0..{horizon // 2} (half the horizon), got {d}")
    if not max(d, 1) <= s <= horizon - d:
        raise ValueError(
            f"execute_horizon must be in max(inference_delay, 1)..horizon - inference_delay "
            f"= {max(d, 1)}..{horizon - d}, got {s}"
        )
    if guidance.schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {guidance.schedule!r}")
    beta = guidance.max_guidance_weight
    if isinstance(beta, bool) or not isinstance(beta, int | float | np.integer | np.floating):
        raise ValueError(f"max_guidance_weight must be a number, got {beta!r}")
    if not (math.isfinite(beta) and 0 <= beta <= MAX_GUIDANCE_WEIGHT):
        raise ValueError(f"max_guidance_weight must be in [0, {MAX_GUIDANCE_WEIGHT:g}], got {beta}")


@dataclasses.dataclass(frozen=True)
class InferenceRequest:
    """One robot's request to the engine.

    `deadline` is on `time.monotonic()`: past it the engine answers `DeadlineExceeded` instead of
    running the request (None: the engine's default deadline from submission).
    """

    observation: Observation
    prompt: str
    options: Options = Options()
    kind: Kind = "infer"
    priority: Priority = "action"
    deadline: float | None = None
    guidance: ChunkGuidance | None = None  # real-time chunking; None samples unguided
    return_model_actions: bool = False  # also answer the chunk in model space


@dataclasses.dataclass(frozen=True)
class InferenceResult:
    """What the engine answers. `actions` is (horizon, robot action dim), None for a subtask-only
    request; `timing` holds `total_ms`, `subtask_ms`, `action_ms` and `queue_ms`."""

    actions: np.ndarray | None
    subtask: str | None
    subtask_tokens: tuple[int, ...]
    state: np.ndarray | None
    timing: Mapping[str, float]
    # The chunk in model space (horizon, model action dim), normalized and padded, when asked.
    model_actions: np.ndarray | None = None
    # Rows in the batch that answered it (its last phase): what its timings are read against.
    batch: int = 1


@dataclasses.dataclass(frozen=True)
class EngineStats:
    """What an operator's metrics read off a backend at scrape time (cheap: counters it keeps
    anyway). `batches` maps (phase, real rows) to executed batches ("subtask" counts decoding
    starts); `compiles` maps a phase to (compiles, seconds spent)."""

    healthy: bool
    queued: int
    in_flight: int
    batches: Mapping[tuple[str, int], int]
    compiles: Mapping[str, tuple[int, float]]
    failed_batches: int = 0
    nonfinite_rows: int = 0


class EngineError(Exception):
    """An engine failure with a wire code (`busy`, `timeout`, `internal`, `unavailable`)."""

    code = "internal"

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class EngineBusy(EngineError):
    """The engine's queue is full: retry later."""

    code = "busy"


class DeadlineExceeded(EngineError):
    """The request's deadline passed before the engine ran it."""

    code = "timeout"
