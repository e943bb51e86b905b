"""The model a PyTorch-layout checkpoint's `config.json` describes, as one of our `ModelConfig`s.

LeRobot's `PI05Config` (`"type": "pi05"`) names its two Gemma towers by variant (`gemma_2b`,
`gemma_300m`) and builds PaliGemma's SigLIP So400m and 257,152-token vocabulary whatever they are;
the dimensions therefore come from the variant names (`configs.models.GEMMA_VARIANTS`), the vision
tower and vocabulary from the registered config with that VLM tower (`dummy`, openpi's test
variant, is the project's tiny model with its own small SigLIP and vocabulary), and the chunk,
action width, image resolution, prompt length and flow steps from the file. The weights are then
checked against exactly that config (`torch_checkpoint.check_header`).

Its input features give the camera slots: LeRobot feeds its cameras to the model in the order of
its visual features, so slot i is feature i. A slot is named by the model's camera key that the
feature's short name is (`observation.images.base_0_rgb` -> `base_0_rgb`), else by the next key no
feature takes; the fine-tune's own names (`observation.images.front` and `front`) become aliases
of their slot, so that any wire may name the cameras either way.

openpi's own conversion writes a smaller `config.json` (variants, action dim and horizon,
precision) beside `assets/<asset id>/`: the config served is the one asked for, and every value
the file states must agree with it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from configs import get_model_config
from configs.model_config import IMAGE_KEYS, GemmaConfig, ModelConfig
from configs.models import GEMMA_VARIANTS
from policy.checkpoint import CheckpointError

CONFIG = "config.json"
STATE, ACTION, VISUAL = "STATE", "ACTION", "VISUAL"
_CAMERA_PREFIXES = ("observation.images.", "observation.")


@dataclasses.dataclass(frozen=True)
class LeRobotPolicy:
    """What a LeRobot `PI05Config` says about serving its checkpoint."""

    cfg: ModelConfig
    cameras: tuple[str, ...]
    """LeRobot's visual feature names, in slot order (`cfg.image_keys[i]` is `cameras[i]`)."""
    state_feature: str
    state_dim: int
    action_feature: str
    action_dim: int

    @property
    def camera_aliases(self) -> dict[str, str]:
        """Each feature's full and short name -> its model camera key (a name that is the key itself is left out)."""
        aliases: dict[str, str] = {}
        for feature, key in zip(self.cameras, self.cfg.image_keys, strict=True):
            for name in (feature, short_name(feature)):
                if name != key and name not in self.cfg.image_keys:
                    aliases[name] = key
        return aliases


def short_name(feature: str) -> str:
    """`observation.images.front` -> `front` (`observation.image` -> `image`)."""
    for prefix in _CAMERA_PREFIXES:
        if feature.startswith(prefix):
            return feature.removeprefix(prefix)
    return feature


def read_json(path: Path, source: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{source}: {path.name} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{source}: {path.name} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{source}: {path.name} is not a JSON object")
    return data


def is_lerobot(config: dict[str, Any]) -> bool:
    """LeRobot's policy configs carry their `type`; openpi's conversion writes none."""
    return "type" in config


def _field(config: dict[str, Any], name: str, kind: type, source: str):
    if name not in config:
        raise CheckpointError(f"{source}: config.json has no {name!r}")
    value = config[name]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise CheckpointError(f"{source}: config.json's {name!r} is {value!r}, not a {kind.__name__}")
    return value


def _variant(config: dict[str, Any], name: str, source: str):
    variant = _field(config, name, str, source)
    if variant not in GEMMA_VARIANTS:
        raise CheckpointError(
            f"{source}: config.json's {name} {variant!r} is not a known Gemma variant ({', '.join(GEMMA_VARIANTS)})"
        )
    return GEMMA_VARIANTS[variant]


def _variant_name(tower: GemmaConfig) -> str:
    return next((name for name, g in GEMMA_VARIANTS.items() if g == tower), str(tower))


def _vision_and_vocabulary(vlm_variant: str) -> ModelConfig:
    """The registered config whose SigLIP and vocabulary go with a VLM tower: LeRobot builds
    PaliGemma's for its own variants; openpi's `dummy` is the project's tiny model."""
    return get_model_config("pi05_tiny" if vlm_variant == "dummy" else "pi05")


def _features(config: dict[str, Any], key: str, source: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    raw = _field(config, key, dict, source)
    try:
        return {name: (f["type"], tuple(int(d) for d in f["shape"])) for name, f in raw.items()}
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{source}: config.json's {key} are not LeRobot features ({{type, shape}})") from None


def _one_feature(features: dict, kind: str, where: str, source: str) -> tuple[str, int]:
    found = [(name, shape) for name, (t, shape) in features.items() if t == kind]
    if len(found) != 1 or len(found[0][1]) != 1:
        raise CheckpointError(
            f"{source}: config.json's {where} hold {len(found)} {kind} features {[n for n, _ in found]}; "
            f"Pi0.5 takes exactly one 1-D {kind.lower()} vector"
        )
    return found[0][0], found[0][1][0]


def _slots(cameras: list[str]) -> tuple[str, ...]:
    """The model camera key of each slot (module docstring)."""
    taken = {short_name(c) for c in cameras} & set(IMAGE_KEYS)
    free = iter(k for k in IMAGE_KEYS if k not in taken)
    return tuple(short_name(c) if short_name(c) in IMAGE_KEYS else next(free, short_name(c)) for c in cameras)


def read_lerobot(config: dict[str, Any], source: str) -> LeRobotPolicy:
    """The `ModelConfig`, cameras, state and action of a LeRobot `PI05Config`'s JSON; a value the
    project cannot serve (another policy type, relative actions, observation memory, a camera
    count the model cannot take) is one `CheckpointError` line naming it."""
    if config.get("type") != "pi05":
        raise CheckpointError(f"{source}: a LeRobot {config.get('type')!r} policy, not a Pi0.5 ('pi05')")
    for flag in ("use_relative_actions", "use_visual_memory", "use_proprioceptive_memory"):
        if config.get(flag):
            raise CheckpointError(f"{source}: config.json sets {flag}, which this runtime does not serve")
    vlm_variant = _field(config, "paligemma_variant", str, source)
    base = _vision_and_vocabulary(vlm_variant)
    resolution = config.get("image_resolution", [base.siglip.image_size] * 2)
    if not (isinstance(resolution, list) and len(resolution) == 2 and resolution[0] == resolution[1]):
        raise CheckpointError(f"{source}: config.json's image_resolution {resolution!r} is not square")
    inputs = _features(config, "input_features", source)
    outputs = _features(config, "output_features", source)
    cameras = [name for name, (kind, _) in inputs.items() if kind == VISUAL]
    if not cameras:
        raise CheckpointError(f"{source}: config.json's input_features hold no VISUAL (camera) feature")
    state_feature, state_dim = _one_feature(inputs, STATE, "input_features", source)
    action_feature, action_dim = _one_feature(outputs, ACTION, "output_features", source)
    try:
        cfg = base.replace(
            name=f"lerobot:{source}",
            vlm=_variant(config, "paligemma_variant", source),
            expert=_variant(config, "action_expert_variant", source),
            siglip=dataclasses.replace(base.siglip, image_size=int(resolution[0])),
            action_dim=_field(config, "max_action_dim", int, source),
            action_horizon=_field(config, "chunk_size", int, source),
            max_token_len=_field(config, "tokenizer_max_length", int, source),
            num_steps=_field(config, "num_inference_steps", int, source),
            dtype=_field(config, "dtype", str, source),
            image_keys=_slots(cameras),
            discrete_state_input=True,
            asset_id=None,
            trained_task=None,
        )
    except ValueError as e:  # the config's own checks: tower mismatch, a size that does not divide
        raise CheckpointError(f"{source}: config.json describes no valid Pi0.5: {e}") from None
    max_state = _field(config, "max_state_dim", int, source)
    for what, dim, limit in (("state", state_dim, max_state), ("action", action_dim, cfg.action_dim)):
        if dim > limit:
            raise CheckpointError(f"{source}: config.json's {what} feature has {dim} values, more than max {limit}")
    return LeRobotPolicy(cfg, tuple(cameras), state_feature, state_dim, action_feature, action_dim)


def check_openpi_conversion(config: dict[str, Any], cfg: ModelConfig, source: str) -> None:
    """openpi's conversion states its variants, action dim and horizon: each must be `cfg`'s."""
    stated = {
        "paligemma_variant": (_variant_name(_variant(config, "paligemma_variant", source)), _variant_name(cfg.vlm)),
        "action_expert_variant": (
            _variant_name(_variant(config, "action_expert_variant", source)),
            _variant_name(cfg.expert),
        ),
        "action_dim": (_field(config, "action_dim", int, source), cfg.action_dim),
        "action_horizon": (_field(config, "action_horizon", int, source), cfg.action_horizon),
    }
    for name, (value, wanted) in stated.items():
        if value != wanted:
            raise CheckpointError(
                f"{source}: config.json's {name} {value!r} contradicts config {cfg.name!r} ({wanted!r}); "
                "pass the --config it was converted from"
            )
