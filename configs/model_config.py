"""Typed, frozen, hashable descriptions of a Pi0.5 network.

Hashable so a config can be a static argument of a jitted function; frozen so a config that
reached a compiled function can never change under it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

DType = Literal["float32", "bfloat16"]

IMAGE_KEYS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    """One Gemma tower (openpi's `gemma.get_config` variants are rows of `GEMMA_VARIANTS`)."""

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        _check_positive(self)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")


@dataclasses.dataclass(frozen=True)
class SiglipConfig:
    """A big_vision ViT with learned position embeddings, no pooling, and a projection head."""

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    patch_size: int = 14
    image_size: int = 224

    def __post_init__(self) -> None:
        _check_positive(self)
        if self.width % self.num_heads:
            raise ValueError(f"siglip width {self.width} is not a multiple of num_heads {self.num_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid


@dataclasses.dataclass(frozen=True)
class PromptFormat:
    """Text layouts of the two inference stages, kept together so they can never drift apart.

    `{task}`, `{state}` and `{subtask}` are filled in. The subtask layouts continue the subtask
    prefix with the generated text, so the action stage sees exactly what the model wrote.
    """

    action: str = "Task: {task}, State: {state};\nAction: "
    action_no_state: str = "Task: {task};\nAction: "
    subtask: str = "Task: {task}, State: {state};\nSubtask:"
    subtask_no_state: str = "Task: {task};\nSubtask:"
    action_with_subtask: str = "Task: {task}, State: {state};\nSubtask: {subtask};\nAction: "
    action_with_subtask_no_state: str = "Task: {task};\nSubtask: {subtask};\nAction: "


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A whole Pi0.5 model: towers, sizes of the action chunk and the prompt, and compute dtype."""

    name: str
    vlm: GemmaConfig
    expert: GemmaConfig
    siglip: SiglipConfig
    vocab_size: int = 257_152
    action_dim: int = 32
    action_horizon: int = 50
    max_token_len: int = 200
    discrete_state_input: bool = True
    image_keys: tuple[str, ...] = IMAGE_KEYS
    dtype: DType = "bfloat16"
    num_steps: int = 10
    prompt_format: PromptFormat = PromptFormat()
    tokenizer: str = "paligemma"
    # openpi's asset id: the checkpoint's `assets/<asset_id>/norm_stats.json` holds this robot's
    # norm stats. None where a checkpoint serves several robots (pi05_base) or has no stats.
    asset_id: str | None = None
    # The task its weights were trained on (a `robots.tasks.TASKS` name, e.g. "pick-place"), reported
    # in the server's ping, so that a simulated robot can set itself up for it. None: no one task.
    trained_task: str | None = None

    def __post_init__(self) -> None:
        for field in ("depth", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self.vlm, field) != getattr(self.expert, field):
                raise ValueError(
                    f"the two Gemma towers must share {field}: vlm has {getattr(self.vlm, field)}, "
                    f"expert has {getattr(self.expert, field)}"
                )
        for field in ("vocab_size", "action_dim", "action_horizon", "max_token_len", "num_steps"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{field} must be positive, got {getattr(self, field)}")
        if not self.image_keys or len(set(self.image_keys)) != len(self.image_keys):
            raise ValueError(f"image_keys must be non-empty and unique, got {self.image_keys}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")

    @property
    def prefix_len(self) -> int:
        return len(self.image_keys) * self.siglip.num_tokens + self.max_token_len

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def _check_positive(cfg: Any) -> None:
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if isinstance(value, int) and value <= 0:
            raise ValueError(f"{type(cfg).__name__}.{field.name} must be positive, got {value}")
