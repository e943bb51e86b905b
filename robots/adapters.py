"""Field mappings between the observation and action layouts of real robots and Pi0.5's.

openpi's `DroidInputs`/`DroidOutputs`, `LiberoInputs`/`LiberoOutputs` and
`AlohaInputs`/`AlohaOutputs` (with `adapt_to_pi`), as pure functions of numpy data: the same
keys, the same state layout, the same action dimensions, so such a robot (or an openpi client)
plugs in without glue code. `lerobot` passes a LeRobot fine-tune's own observation names through
(its checkpoint defines the cameras, state and actions, which the engine knows as aliases).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

BASE, LEFT_WRIST, RIGHT_WRIST = "base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb"


@dataclasses.dataclass(frozen=True)
class ModelInputs:
    """An observation in Pi0.5's terms: HxWx3 uint8 per present camera (absent ones are masked)."""

    images: dict[str, np.ndarray]
    state: np.ndarray
    prompt: str | None


def to_hwc_uint8(name: str, image: Any) -> np.ndarray:
    """openpi's image conversion: CHW becomes HWC, float in [0, 1] becomes uint8."""
    img = np.asarray(image)
    if img.ndim != 3:
        raise ValueError(f"image {name!r} must have 3 dims (HWC or CHW), got shape {img.shape}")
    if np.issubdtype(img.dtype, np.floating):
        img = (255 * img).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise ValueError(f"image {name!r} must be uint8 or float in [0, 1], got {img.dtype}")
    if img.shape[0] == 3 and img.shape[-1] != 3:
        img = np.ascontiguousarray(img.transpose(1, 2, 0))
    if img.shape[-1] != 3:
        raise ValueError(f"image {name!r} must have 3 color channels, got shape {img.shape}")
    return img


def _missing(obs: Mapping[str, Any], key: str, layout: str) -> ValueError:
    # Name a few of the keys it has, not all: the observation may come from anyone.
    keys = [k for k in obs if isinstance(k, str)][:8]
    more = "" if len(obs) <= len(keys) else f" and {len(obs) - len(keys)} more"
    return ValueError(f"{layout} observation is missing {key!r}; it has {keys}{more}")


def _get(obs: Mapping[str, Any], key: str, layout: str) -> Any:
    if key not in obs:
        raise _missing(obs, key, layout)
    return obs[key]


def _vector(obs: Mapping[str, Any], key: str, layout: str, size: int | None = None) -> np.ndarray:
    raw = _get(obs, key, layout)
    if not isinstance(raw, np.ndarray | list | tuple | int | float | np.number) or isinstance(raw, bool):
        raise ValueError(f"{layout} {key!r} must be numbers, got {type(raw).__name__}")
    try:
        value = np.atleast_1d(np.asarray(raw, np.float64))
    except (TypeError, ValueError):
        raise ValueError(f"{layout} {key!r} must be numbers") from None
    if value.ndim != 1 or (size is not None and value.size != size):
        want = f"{size} values" if size is not None else "a 1-D vector"
        raise ValueError(f"{layout} {key!r} must be {want}, got shape {value.shape}")
    return value


def _prompt(obs: Mapping[str, Any], key: str = "prompt") -> str | None:
    prompt = obs.get(key)
    if prompt is not None and not isinstance(prompt, str):
        raise ValueError(f"{key} must be a string, got {type(prompt).__name__}")
    return prompt


@dataclasses.dataclass(frozen=True)
class Adapter:
    """One robot layout: `to_model(observation dict)` and `from_model(actions)`; `actions_to_model`
    inverts `from_model` on the layout's dims (real-time chunking sends the leftover back).
    `state_dim`/`action_dim` None: the served model's own (a layout that passes them through)."""

    name: str
    state_dim: int | None
    action_dim: int | None
    to_model: Callable[[Mapping[str, Any]], ModelInputs]
    from_model: Callable[[np.ndarray], np.ndarray]
    example: Callable[[np.random.Generator], dict[str, Any]]
    actions_to_model: Callable[[np.ndarray], np.ndarray] = lambda a: np.asarray(a, np.float64)

    def for_model(self, action_dim: int) -> Adapter:
        """This layout in front of a model of `action_dim` robot actions: a pass-through layout
        takes that width, which openpi clients are told and their leftovers are checked against."""
        return self if self.action_dim is not None else dataclasses.replace(self, action_dim=action_dim)


# ----------------------------------------------------------------------------- DROID


def _droid_in(obs: Mapping[str, Any]) -> ModelInputs:
    joints = _vector(obs, "observation/joint_position", "droid", 7)
    gripper = _vector(obs, "observation/gripper_position", "droid", 1)
    images = {
        BASE: to_hwc_uint8(
            "observation/exterior_image_1_left", _get(obs, "observation/exterior_image_1_left", "droid")
        ),
        LEFT_WRIST: to_hwc_uint8("observation/wrist_image_left", _get(obs, "observation/wrist_image_left", "droid")),
    }
    return ModelInputs(images, np.concatenate([joints, gripper]), _prompt(obs))


def _droid_example(rng: np.random.Generator) -> dict[str, Any]:
    return {
        "observation/exterior_image_1_left": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
        "observation/wrist_image_left": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
        "observation/joint_position": rng.uniform(-1, 1, 7),
        "observation/gripper_position": rng.uniform(0, 1, 1),
        "prompt": "do something",
    }


# ----------------------------------------------------------------------------- LIBERO


def _libero_in(obs: Mapping[str, Any]) -> ModelInputs:
    images = {
        BASE: to_hwc_uint8("observation/image", _get(obs, "observation/image", "libero")),
        LEFT_WRIST: to_hwc_uint8("observation/wrist_image", _get(obs, "observation/wrist_image", "libero")),
    }
    return ModelInputs(images, _vector(obs, "observation/state", "libero", 8), _prompt(obs))


def _libero_example(rng: np.random.Generator) -> dict[str, Any]:
    return {
        "observation/image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
        "observation/wrist_image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
        "observation/state": rng.uniform(-1, 1, 8),
        "prompt": "do something",
    }


# ----------------------------------------------------------------------------- ALOHA

ALOHA_CAMERAS = ("cam_high", "cam_low", "cam_left_wrist", "cam_right_wrist")
_FLIP = np.array([1, -1, -1, 1, 1, 1, 1, 1, -1, -1, 1, 1, 1, 1], np.float64)
_GRIPPERS = [6, 13]


def _scale(x, lo, hi):
    return (x - lo) / (hi - lo)


def _unscale(x, lo, hi):
    return x * (hi - lo) + lo


def gripper_to_angular(value: np.ndarray) -> np.ndarray:
    """ALOHA's linear gripper position to the angular space pi0 was trained in.

    Constants: ALOHA's puppet gripper open/closed positions (0.01844, 0.05800), Interbotix's
    arm length 0.036 and horn radius 0.022, and pi0's encoder range in radians (0.5476, 1.6296).
    """
    linear = _unscale(value, 0.01844, 0.05800)
    ratio = (0.022**2 + linear**2 - 0.036**2) / (2 * 0.022 * linear)
    return _scale(np.arcsin(np.clip(ratio, -1.0, 1.0)), 0.5476, 1.6296)


def gripper_from_angular(value: np.ndarray) -> np.ndarray:
    """pi0's gripper output to ALOHA's puppet gripper joint range (-0.6213, 1.4910)."""
    return _scale(value + 0.5476, -0.6213, 1.4910)


def _aloha_in(obs: Mapping[str, Any]) -> ModelInputs:
    cams = _get(obs, "images", "aloha")
    if not isinstance(cams, Mapping):
        raise ValueError("aloha 'images' must be a map of camera name to CHW image")
    unknown = set(cams) - set(ALOHA_CAMERAS)
    if unknown:
        raise ValueError(f"aloha cameras must be among {ALOHA_CAMERAS}, got {sorted(cams)}")
    if "cam_high" not in cams:
        raise ValueError("aloha observation is missing the 'cam_high' camera")
    images = {BASE: to_hwc_uint8("cam_high", cams["cam_high"])}
    for dest, src in ((LEFT_WRIST, "cam_left_wrist"), (RIGHT_WRIST, "cam_right_wrist")):
        if src in cams:
            images[dest] = to_hwc_uint8(src, cams[src])
    state = _FLIP * _vector(obs, "state", "aloha", 14)
    state[_GRIPPERS] = gripper_to_angular(state[_GRIPPERS])
    return ModelInputs(images, state, _prompt(obs))


def _aloha_out(actions: np.ndarray) -> np.ndarray:
    out = _FLIP * np.asarray(actions, np.float64)[:, :14]
    out[:, _GRIPPERS] = gripper_from_angular(out[:, _GRIPPERS])
    return out


def _aloha_actions_in(actions: np.ndarray) -> np.ndarray:
    """`_aloha_out` inverted: ALOHA's actions back into pi0's space (the flips are their own inverse)."""
    out = np.array(actions, np.float64)
    out[:, _GRIPPERS] = _unscale(out[:, _GRIPPERS], -0.6213, 1.4910) - 0.5476
    return _FLIP * out


def _aloha_example(rng: np.random.Generator) -> dict[str, Any]:
    return {
        "state": np.ones(14),
        "images": {k: rng.integers(0, 256, (3, 224, 224), dtype=np.uint8) for k in ALOHA_CAMERAS},
        "prompt": "do something",
    }


# ----------------------------------------------------------------------------- LeRobot

LEROBOT_IMAGES = "observation.images."  # LeRobot's camera feature names: this prefix and the camera


def _lerobot_in(obs: Mapping[str, Any]) -> ModelInputs:
    """A LeRobot policy's input names: the engine resolves `observation.images.<name>` through the
    checkpoint's camera aliases and checks the state's size against its statistics, so neither is
    renamed nor sized here; the prompt is `prompt`, else LeRobot's `task`."""
    images = {
        key: to_hwc_uint8(key, value)
        for key, value in obs.items()
        if isinstance(key, str) and key.startswith(LEROBOT_IMAGES)
    }
    if not images:
        raise _missing(obs, f"{LEROBOT_IMAGES}<camera>", "lerobot")
    prompt = _prompt(obs) if obs.get("prompt") is not None else _prompt(obs, "task")
    return ModelInputs(images, _vector(obs, "observation.state", "lerobot"), prompt)


def _lerobot_example(rng: np.random.Generator) -> dict[str, Any]:
    """An SO-101 fine-tune's observation (front and wrist cameras, 6 joints), its frames uint8 HWC
    as openpi clients send them (LeRobot's CHW floats in [0, 1] are converted too, 4x the bytes)."""
    return {
        f"{LEROBOT_IMAGES}front": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
        f"{LEROBOT_IMAGES}wrist": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
        "observation.state": rng.uniform(-1, 1, 6),
        "task": "do something",
    }


ADAPTERS: dict[str, Adapter] = {
    "droid": Adapter("droid", 8, 8, _droid_in, lambda a: np.asarray(a, np.float64)[:, :8], _droid_example),
    "libero": Adapter("libero", 8, 7, _libero_in, lambda a: np.asarray(a, np.float64)[:, :7], _libero_example),
    "aloha": Adapter("aloha", 14, 14, _aloha_in, _aloha_out, _aloha_example, _aloha_actions_in),
    "lerobot": Adapter("lerobot", None, None, _lerobot_in, lambda a: np.asarray(a, np.float64), _lerobot_example),
}


def get_adapter(name: str) -> Adapter:
    try:
        return ADAPTERS[name]
    except KeyError:
        raise ValueError(f"unknown robot layout {name!r}; known: {sorted(ADAPTERS)}") from None
