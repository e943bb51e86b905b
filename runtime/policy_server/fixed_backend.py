"""A backend without a model: every request is checked like the engine checks it and answered
with a fixed chunk of zeros.

`python -m runtime.policy_server --fixed-reply` serves it: for wiring up a robot or a client
before a GPU is at hand, and for measuring the transports alone (the benchmarks and the
hostile-input tests run servers this way, in their own processes). It imports no JAX.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from configs import DEFAULT_IMAGE_RESOLUTIONS, DEFAULT_MODEL, get_model_config
from policy.request import EngineStats, InferenceRequest, InferenceResult, check_guidance


class FixedBackend:
    """Accepts images up to the largest declared resolution each way; answers after `delay_s`, as a
    model would take its time (a robot's latency handling, or a server under load, without a model)."""

    def __init__(
        self,
        config_name: str = DEFAULT_MODEL,
        image_resolutions: tuple[tuple[int, int], ...] = DEFAULT_IMAGE_RESOLUTIONS,
        delay_s: float = 0.0,
    ):
        self.cfg = get_model_config(config_name)
        self.delay_s = delay_s
        self.image_resolutions = image_resolutions
        self.max_image_hw = (max(h for h, _ in image_resolutions), max(w for _, w in image_resolutions))
        self.healthy = True
        self.served = 0
        self._in_flight = 0
        self._batches: collections.Counter[tuple[str, int]] = collections.Counter()

    def info(self) -> dict[str, Any]:
        return {
            "config": self.cfg.name,
            "backend": "fixed reply (no model)",
            "image_keys": list(self.cfg.image_keys),
            "action_horizon": self.cfg.action_horizon,
            "action_dim": self.cfg.action_dim,
            "state_dim": None,  # no norm stats: any state is taken
            "image_resolutions": [list(r) for r in self.image_resolutions],
            "input_resolution": [self.cfg.siglip.image_size] * 2,
            "trained_task": self.cfg.trained_task,
        }

    def check(self, request: InferenceRequest) -> None:
        for name, image in request.observation.images.items():
            if name not in self.cfg.image_keys:
                raise ValueError(f"unknown camera {name!r}; this model's cameras are {list(self.cfg.image_keys)}")
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
                raise ValueError(f"image {name!r} must be H x W x 3 uint8, got {image.dtype} {image.shape}")
            if image.shape[0] > self.max_image_hw[0] or image.shape[1] > self.max_image_hw[1]:
                raise ValueError(f"image {name!r} is {image.shape[:2]}, larger than {self.max_image_hw}")
        state = request.observation.state
        if state is not None and not np.isfinite(np.asarray(state, np.float64)).all():
            raise ValueError("state contains NaN or infinity")
        if not request.prompt.strip():
            raise ValueError("high_level_prompt must be a non-empty string")
        if request.guidance is not None:
            if request.kind != "infer":
                raise ValueError("guidance steers actions: a subtask-only request takes none")
            check_guidance(request.guidance, self.cfg.action_horizon, self.cfg.action_dim)

    async def prepare_images(self, images: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(images)

    def stats(self) -> EngineStats:
        """Each request is a batch of one, of its phase; nothing compiles."""
        return EngineStats(self.healthy, 0, self._in_flight, dict(self._batches), {})

    async def submit(self, request: InferenceRequest) -> InferenceResult:
        start = time.perf_counter()
        self._in_flight += 1
        try:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
        finally:
            self._in_flight -= 1
        self.served += 1
        self._batches[("action" if request.kind == "infer" else "subtask", 1)] += 1
        actions = model_actions = None
        if request.kind == "infer":
            actions = np.zeros((self.cfg.action_horizon, self.cfg.action_dim), np.float32)
            if request.return_model_actions:
                model_actions = np.zeros_like(actions)
        ms = (time.perf_counter() - start) * 1e3
        return InferenceResult(
            actions=actions,
            subtask="fixed reply" if request.options.generate_subtask or request.kind == "subtask" else None,
            subtask_tokens=(),
            state=request.observation.state,
            timing={"total_ms": ms, "subtask_ms": 0.0, "action_ms": 0.0, "queue_ms": 0.0},
            model_actions=model_actions,
        )
