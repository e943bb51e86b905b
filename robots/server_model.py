"""The simulated arm set up for the model the server runs, from the server's `ping` reply.

A model takes certain cameras at a certain resolution, a state of a certain size (its norm stats
say which) and gives actions of a certain size; a model trained on a task expects that task's
scene and prompt. The ping's `model` block says all of it, so `python -m robots.run --robot sim`
needs no flags to drive the shipped demo policy, and a robot flag that contradicts the model is
reported in one line that names the flag that fixes it, before any request the server would refuse.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from robots.sim import CAMERAS, SimArm
from robots.tasks import TASKS

log = logging.getLogger(__name__)

# `--task auto`: the task the server's model was trained on, if any; `none`: no task (joint deltas).
AUTO, NO_TASK = "auto", "none"


class Mismatch(ValueError):
    """The robot as asked for cannot drive the server's model: one line, naming the fix."""


@dataclasses.dataclass(frozen=True)
class ServerModel:
    """What the ping's `model` block says the model takes and gives (None: not reported, anything goes)."""

    config: str
    image_keys: tuple[str, ...]
    action_dim: int
    action_horizon: int
    state_dim: int | None = None
    input_resolution: tuple[int, int] | None = None
    trained_task: str | None = None
    weights: str | None = None  # None: a checkpoint's
    # A checkpoint trained on a LeRobot dataset: its camera names (`observation.images.front` and
    # `front`) -> the model's camera slots.
    camera_aliases: dict[str, str] | None = None

    @classmethod
    def from_ping(cls, reply: dict[str, Any]) -> ServerModel:
        model = reply["model"]
        resolution = model.get("input_resolution")
        return cls(
            config=model["config"],
            image_keys=tuple(model["image_keys"]),
            action_dim=int(model["action_dim"]),
            action_horizon=int(model["action_horizon"]),
            state_dim=model.get("state_dim"),
            input_resolution=tuple(resolution) if resolution else None,
            trained_task=model.get("trained_task"),
            weights=_weights(model),
            camera_aliases=model.get("camera_aliases") or None,
        )

    @property
    def label(self) -> str:
        """The model and its weights, for a status line: "pi05_demo (random weights)"."""
        return self.config if self.weights is None else f"{self.config} ({self.weights})"


def _weights(model: dict[str, Any]) -> str | None:
    """What answers when it is no checkpoint's weights: a fixed reply (the only backend that names
    itself), or random weights."""
    if "backend" in model:
        return "fixed reply"
    return "random weights" if model.get("checkpoint") is None else None


def task_name(model: ServerModel, asked: str) -> str | None:
    """The task the arm runs: the one asked for, or with `auto` the model's, if this arm has it."""
    if asked == NO_TASK:
        return None
    if asked != AUTO:
        if model.trained_task != asked:
            log.warning("the server's model %s was not trained on %s: expect no successes", model.config, asked)
        return asked
    if model.trained_task is not None and model.trained_task not in TASKS:
        log.warning(
            "the server's model %s was trained on %r, which the sim arm lacks", model.config, model.trained_task
        )
        return None
    return model.trained_task


def fit_sim(
    model: ServerModel, task: str = AUTO, image_size: int | None = None, control_hz: float = 50.0, seed: int = 0
) -> tuple[SimArm, str | None]:
    """The sim arm for `model` and the name of its task (`task`: a `TASKS` name, `auto` or `none`):
    the model's cameras at its resolution (or `image_size`), state and actions of the sizes it
    takes. Raises `Mismatch` when the arm as asked for cannot give the model what it takes."""
    cameras = tuple(c for c in CAMERAS if c in model.image_keys)
    if not cameras:
        raise Mismatch(
            f"the server's model {model.config} takes cameras {', '.join(model.image_keys)}; the sim arm has "
            f"{', '.join(CAMERAS)}: serve a config with Pi0.5's cameras (e.g. --config pi05_demo)"
        )
    name = task_name(model, task)
    if image_size is None:
        image_size = model.input_resolution[0] if model.input_resolution else 224
    arm = SimArm(
        control_hz=control_hz,
        image_size=image_size,
        seed=seed,
        task=TASKS[name]() if name is not None else None,
        cameras=cameras,
    )
    state_dim = int(arm.state.shape[0])
    if (model.state_dim is not None and model.state_dim != state_dim) or model.action_dim < arm.action_dim:
        arm_is = f"with --task {name}" if name is not None else "without a task"
        takes = f"{model.state_dim} state values" if model.state_dim is not None else "any state"
        trained = f" (trained on {model.trained_task})" if model.trained_task else ""
        fits = model.trained_task in TASKS and model.trained_task != name
        fix = f"--task {model.trained_task}" if fits else "another --task, or serve another --config"
        raise Mismatch(
            f"the server's model {model.config}{trained} takes {takes} and gives {model.action_dim} action values; "
            f"the sim arm {arm_is} has {state_dim} state values and takes {arm.action_dim}: use {fix}"
        )
    return arm, name
