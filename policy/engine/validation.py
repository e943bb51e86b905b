"""Checks an `InferenceRequest` against one engine's model before any device or heavy host work.

Every error is a `ValueError` naming the field, so a transport can answer `bad_request` with it.
The checks are cheap: shapes and dtypes, option ranges, the state against the norm stats, real-time
chunking's leftover in model space (normalized as the engine will guide toward it), and the token
budget of the prompt the request will certainly need (tokenized once: `Prompts` remembers it for
the host preparation). A camera may be named by its model key or by an alias of it (a LeRobot
fine-tune's own feature names, `camera_aliases`), once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from configs.model_config import ModelConfig
from policy.engine.images import Resizer, check_image
from policy.normalize import Normalizer
from policy.prompts import Prompts
from policy.request import InferenceRequest, Observation, Options, check_guidance

KINDS = ("infer", "subtask")
PRIORITIES = ("action", "refresh")


class RequestValidator:
    """`check(request)` for one model configuration, its norm stats and its limits."""

    def __init__(
        self,
        cfg: ModelConfig,
        prompts: Prompts,
        normalizer: Normalizer,
        resizer: Resizer,
        max_decoding_steps_limit: int,
        max_image_side: int,
        camera_aliases: Mapping[str, str] | None = None,
    ):
        self.cfg = cfg
        self.camera_aliases = dict(camera_aliases or {})
        self.prompts = prompts
        self.normalizer = normalizer
        self.resizer = resizer
        self.max_decoding_steps_limit = max_decoding_steps_limit
        self.max_image_side = max_image_side
        self.state_dim = normalizer.state.dim if normalizer.state else None
        self.action_dim = normalizer.actions.dim if normalizer.actions else cfg.action_dim

    def check(self, request: InferenceRequest) -> None:
        if not isinstance(request, InferenceRequest):
            raise ValueError(f"expected an InferenceRequest, got {type(request).__name__}")
        if request.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {request.kind!r}")
        if request.priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {PRIORITIES}, got {request.priority!r}")
        if request.deadline is not None and not (
            isinstance(request.deadline, int | float) and math.isfinite(request.deadline)
        ):
            raise ValueError(f"deadline must be a time.monotonic() value, got {request.deadline!r}")
        if not isinstance(request.observation, Observation):
            raise ValueError(f"observation must be an Observation, got {type(request.observation).__name__}")
        self.check_images(request.observation.images)
        if not isinstance(request.prompt, str) or not request.prompt.strip():
            raise ValueError("prompt must be a non-empty string")
        state = self.check_state(request.observation.state)
        options = request.options
        if not isinstance(options, Options):
            raise ValueError(f"options must be an Options, got {type(options).__name__}")
        low = options.low_level_prompt
        if low is not None and (not isinstance(low, str) or not low.strip()):
            raise ValueError("low_level_prompt must be a non-empty string when given")
        steps = options.max_decoding_steps
        if isinstance(steps, bool) or not isinstance(steps, int | np.integer):
            raise ValueError(f"max_decoding_steps must be an integer, got {steps!r}")
        decodes = decodes_subtask(request)
        if decodes and not 1 <= steps <= self.max_decoding_steps_limit:
            raise ValueError(f"max_decoding_steps must be in 1..{self.max_decoding_steps_limit}, got {steps}")
        temperature = options.temperature
        if isinstance(temperature, bool) or not isinstance(temperature, int | float | np.floating):
            raise ValueError(f"temperature must be a number, got {temperature!r}")
        if not (math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
        seed = options.seed
        if seed is not None and (
            isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= seed < 2**32
        ):
            raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
        if request.guidance is not None:
            if request.kind != "infer":
                raise ValueError("guidance steers actions: a subtask-only request takes none")
            check_guidance(request.guidance, self.cfg.action_horizon, self.action_dim, self._leftover_to_model)
        normalized = None if state is None else self.normalizer.normalize_state(state)
        if decodes:
            self.prompts.tokenize(self.prompts.subtask_text(request.prompt, normalized))
        else:
            self.prompts.tokenize(self.prompts.action_text(request.prompt, normalized, low))

    def _leftover_to_model(self, leftover: np.ndarray) -> np.ndarray:
        """A leftover in model space, exactly as the host preparation will guide toward it."""
        return self.normalizer.normalize_actions(leftover, self.cfg.action_dim)

    def check_images(self, images: object) -> None:
        if not isinstance(images, Mapping) or not images:
            raise ValueError(
                f"images must be a non-empty mapping of camera name to image; cameras: {list(self.cfg.image_keys)}"
            )
        seen: dict[str, str] = {}
        for name, image in images.items():
            key = self.camera_aliases.get(name, name)
            if key not in self.cfg.image_keys:
                names = list(self.cfg.image_keys) + list(self.camera_aliases)
                raise ValueError(f"unknown camera {name!r}; this model's cameras are {names}")
            if key in seen:
                raise ValueError(f"cameras {seen[key]!r} and {name!r} are the same camera ({key!r}): send it once")
            seen[key] = name
            check_image(name, image)
            if max(image.shape[:2]) > self.max_image_side:
                raise ValueError(
                    f"image {name!r} is {image.shape[0]}x{image.shape[1]}, larger than {self.max_image_side} on a side"
                )
            self.resizer.check(name, image)

    def check_state(self, state: object) -> np.ndarray | None:
        """The state as float32, or `ValueError`."""
        if state is None:
            return None
        try:
            arr = np.asarray(state, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError("state must be a list of numbers") from None
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError(f"state must be a non-empty 1-D list of numbers, got shape {arr.shape}")
        if not np.isfinite(arr).all():
            raise ValueError("state contains NaN or infinity")
        expected = self.state_dim
        if expected is not None and arr.size != expected:
            raise ValueError(f"state has {arr.size} values, this robot's norm stats expect {expected}")
        if expected is None and arr.size > self.cfg.action_dim:
            raise ValueError(f"state has {arr.size} values, more than the model's {self.cfg.action_dim}")
        return arr.astype(np.float32)


def decodes_subtask(request: InferenceRequest) -> bool:
    """Whether the request runs the subtask phase."""
    return request.kind == "subtask" or bool(request.options.generate_subtask)
