"""Typed requests for the engine's tests: random camera images, a request with the engine's
defaults, and the batch row the engine prepares from one (what the model is fed)."""

from __future__ import annotations

from typing import Any

import numpy as np

from policy.request import InferenceRequest, Observation, Options

CAMERAS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")


def random_images(seed: int, cameras=CAMERAS, shape=(224, 224, 3)) -> dict[str, np.ndarray]:
    """uint8 images for `cameras`, the same for the same seed."""
    rng = np.random.default_rng(seed)
    return {k: rng.integers(0, 256, shape, dtype=np.uint8) for k in cameras}


def inference_request(
    images=None, prompt="pick up the pen", state=None, kind="infer", priority="action", **options
) -> InferenceRequest:
    """A request as the server builds one; `options` are `Options` fields."""
    images = random_images(0) if images is None else images
    state = None if state is None else np.asarray(state, np.float32)
    return InferenceRequest(Observation(images, state), prompt, Options(**options), kind=kind, priority=priority)


def prepared_row(engine: Any, request: InferenceRequest) -> Any:
    """The batch row `engine` (an `AsyncPi05Inference`) prepares on the host for `request`."""
    from policy.engine.scheduler import Ticket

    ticket = Ticket(request, request.options.seed, 0.0, 0.0, None, False)
    engine._prep.prepare(ticket)
    return ticket.row
