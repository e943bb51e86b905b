"""A LeRobot checkpoint's normalization, from the processors saved beside the policy.

LeRobot saves its pipelines as `policy_preprocessor.json` and `policy_postprocessor.json`; the
`normalizer_processor` step of the first and the `unnormalizer_processor` step of the second name
their mode per feature type (`norm_map`: QUANTILES or MEAN_STD for Pi0.5), their `eps`, and a
safetensors file of statistics keyed `<feature>.<stat>` (`observation.state.q01`,
`action.std`, ...). The state's statistics come from the preprocessor, the actions' from the
postprocessor (the ones that turn the model's output into robot units), as LeRobot itself uses
them. A missing file or statistic, or two files that disagree, is one `CheckpointError` line: actions
left in the model's [-1, 1] would move a robot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

from policy.checkpoint import CheckpointError
from policy.lerobot_config import LeRobotPolicy, read_json
from policy.normalize import Mode, Normalizer, Stats

PREPROCESSOR = "policy_preprocessor.json"
POSTPROCESSOR = "policy_postprocessor.json"
# LeRobot's modes this runtime serves, and the statistics each reads.
MODES: dict[str, tuple[Mode, tuple[str, ...]]] = {
    "QUANTILES": ("quantile", ("q01", "q99")),
    "MEAN_STD": ("zscore", ("mean", "std")),
}
_IDENTITY = "IDENTITY"
_HOW = (
    "save the policy's processors with it (LeRobot's preprocessor/postprocessor save_pretrained) or pass --norm-stats"
)


def _step(folder: Path, pipeline: str, registry: str, source: str) -> tuple[dict[str, Any], Path]:
    """The config of `pipeline`'s `registry` step and its statistics file."""
    if not (folder / pipeline).is_file():
        raise CheckpointError(f"{source}: no {pipeline}, which holds the normalization statistics; {_HOW}")
    steps = read_json(folder / pipeline, source).get("steps")
    if not isinstance(steps, list):
        raise CheckpointError(f"{source}: {pipeline} holds no list of steps; {_HOW}")
    found = [s for s in steps if isinstance(s, dict) and s.get("registry_name") == registry]
    if len(found) != 1:
        raise CheckpointError(f"{source}: {pipeline} has {len(found)} {registry!r} steps, expected one; {_HOW}")
    step = found[0]
    if not isinstance(step.get("config"), dict) or not isinstance(step.get("state_file"), str):
        raise CheckpointError(f"{source}: {pipeline}'s {registry!r} step names no config and statistics file; {_HOW}")
    stats_file = folder / step["state_file"]
    if Path(step["state_file"]).name != step["state_file"] or not stats_file.is_file():
        raise CheckpointError(f"{source}: {pipeline} names statistics file {step['state_file']!r}, not there; {_HOW}")
    return step["config"], stats_file


def _mode(config: dict[str, Any], kind: str, pipeline: str, source: str) -> str:
    norm_map = config.get("norm_map")
    if not isinstance(norm_map, dict):
        raise CheckpointError(f"{source}: {pipeline}'s normalizer has no norm_map")
    mode = norm_map.get(kind, _IDENTITY)
    if mode != _IDENTITY and mode not in MODES:
        raise CheckpointError(
            f"{source}: {pipeline} normalizes {kind} with {mode}; this runtime serves {', '.join(MODES)} or {_IDENTITY}"
        )
    return mode


def _load(path: Path, source: str) -> dict[str, np.ndarray]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{source}: {path.name} is not a safetensors file: {e}") from None


def _stats(
    stored: dict[str, np.ndarray], path: Path, feature: str, names: tuple[str, ...], dim: int, source: str
) -> Stats:
    fields = {}
    for stat in ("mean", "std", "q01", "q99"):
        value = stored.get(f"{feature}.{stat}")
        if value is None and stat in names:
            raise CheckpointError(f"{source}: {path.name} has no {feature}.{stat}; {_HOW}")
        value = np.full(dim, np.nan) if value is None else np.asarray(value, np.float64).reshape(-1)
        if value.shape != (dim,):
            raise CheckpointError(
                f"{source}: {path.name}'s {feature}.{stat} has {value.size} values, config.json's {feature} has {dim}"
            )
        fields[stat] = value
    return Stats(**fields)


def read_normalizer(folder: Path, policy: LeRobotPolicy, source: str) -> Normalizer:
    """The `Normalizer` LeRobot's processors in `folder` apply to `policy`'s state and actions."""
    pre, pre_file = _step(folder, PREPROCESSOR, "normalizer_processor", source)
    post, post_file = _step(folder, POSTPROCESSOR, "unnormalizer_processor", source)
    pre_stats, post_stats = _load(pre_file, source), _load(post_file, source)
    state_mode = _mode(pre, "STATE", PREPROCESSOR, source)
    action_mode = _mode(post, "ACTION", POSTPROCESSOR, source)
    if _mode(pre, "ACTION", PREPROCESSOR, source) != action_mode:
        raise CheckpointError(f"{source}: {PREPROCESSOR} and {POSTPROCESSOR} normalize ACTION differently")
    modes = {m for m in (state_mode, action_mode) if m != _IDENTITY}
    if len(modes) > 1:
        raise CheckpointError(
            f"{source}: STATE is normalized with {state_mode} and ACTION with {action_mode}; "
            "this runtime takes one mode for both"
        )
    mode, _ = MODES[modes.pop()] if modes else MODES["QUANTILES"]
    eps = pre.get("eps", 1e-8)
    if eps != post.get("eps", 1e-8) or not isinstance(eps, int | float):
        raise CheckpointError(f"{source}: the eps of {PREPROCESSOR} and {POSTPROCESSOR} differ or are not numbers")
    state = actions = None
    if state_mode != _IDENTITY:
        state = _stats(pre_stats, pre_file, policy.state_feature, MODES[state_mode][1], policy.state_dim, source)
    if action_mode != _IDENTITY:
        names = MODES[action_mode][1]
        actions = _stats(post_stats, post_file, policy.action_feature, names, policy.action_dim, source)
        if any(f"{policy.action_feature}.{n}" in pre_stats for n in names):
            before = _stats(pre_stats, pre_file, policy.action_feature, names, policy.action_dim, source)
            if any(not np.array_equal(getattr(before, n), getattr(actions, n)) for n in names):
                raise CheckpointError(f"{source}: {PREPROCESSOR} and {POSTPROCESSOR} hold different action statistics")
    return Normalizer(state=state, actions=actions, mode=mode, eps=float(eps))
