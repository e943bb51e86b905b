"""The registry of named model configurations.

Sizes are table rows (openpi's `gemma.get_config`, big_vision's `decode_variant`), and a model is
a combination of rows. Names match exactly; an unknown name gets the closest match in the error.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from configs.model_config import GemmaConfig, ModelConfig, SiglipConfig

GEMMA_VARIANTS: dict[str, GemmaConfig] = {
    "dummy": GemmaConfig(width=64, depth=4, mlp_dim=128, num_heads=8, num_kv_heads=1, head_dim=16),
    "gemma_300m": GemmaConfig(width=1024, depth=18, mlp_dim=4096, num_heads=8, num_kv_heads=1, head_dim=256),
    "gemma_2b": GemmaConfig(width=2048, depth=18, mlp_dim=16_384, num_heads=8, num_kv_heads=1, head_dim=256),
    # The demo policy's towers: two wide heads rather than eight narrow ones, because on a CPU the
    # attention's memory traffic (heads x tokens^2) costs more than its arithmetic.
    "demo": GemmaConfig(width=64, depth=4, mlp_dim=256, num_heads=2, num_kv_heads=1, head_dim=32),
}

SIGLIP_VARIANTS: dict[str, SiglipConfig] = {
    # The size of openpi's parity fixture: small enough for a 2-core CPU.
    "tiny/14": SiglipConfig(width=32, depth=2, mlp_dim=64, num_heads=2),
    "So400m/14": SiglipConfig(width=1152, depth=27, mlp_dim=4304, num_heads=16),
    # The demo policy's: 48x48 renders of the simulated arm in 4x4 patches of 12 pixels.
    "demo/12": SiglipConfig(width=64, depth=2, mlp_dim=128, num_heads=2, patch_size=12, image_size=48),
}


def _pi05(name: str, **overrides) -> ModelConfig:
    base = dict(
        name=name,
        vlm=GEMMA_VARIANTS["gemma_2b"],
        expert=GEMMA_VARIANTS["gemma_300m"],
        siglip=SIGLIP_VARIANTS["So400m/14"],
    )
    base.update(overrides)
    return ModelConfig(**base)


def _tiny(name: str, **overrides) -> ModelConfig:
    tiny = dict(
        vlm=GEMMA_VARIANTS["dummy"],
        expert=GEMMA_VARIANTS["dummy"],
        siglip=SIGLIP_VARIANTS["tiny/14"],
        vocab_size=1024,
        dtype="float32",
        tokenizer="tiny",
    )
    tiny.update(overrides)
    return _pi05(name, **tiny)


def _build_registry(configs: list[ModelConfig]) -> dict[str, ModelConfig]:
    registry: dict[str, ModelConfig] = {}
    for cfg in configs:
        if cfg.name in registry:
            raise ValueError(f"model config name {cfg.name!r} is defined twice")
        registry[cfg.name] = cfg
    return registry


_MODELS = _build_registry(
    [
        # openpi's pi05 defaults: 3 cameras, 50-step chunks of 32 dims, 200-token prompts.
        _pi05("pi05"),
        _pi05("pi05_droid", action_horizon=15, asset_id="droid"),
        _pi05("pi05_aloha", asset_id="trossen"),
        _pi05("pi05_libero", action_horizon=10, discrete_state_input=False, asset_id="physical-intelligence/libero"),
        # The CPU default and the test model: the layout of openpi's parity fixture.
        _tiny("pi05_tiny"),
        _tiny("pi05_tiny_bf16", dtype="bfloat16"),
        # The policy trained on the simulated arm's pick-and-place task (`python -m runtime.training`),
        # sized to train on 2 CPU cores in about 30 minutes: 3 x 16 image tokens and a 48-token prompt
        # (the longest task prompt with its state and subtask is 40), 30-step chunks (0.6 s at 50 Hz)
        # of the task arm's 3 action values (the gripper's target x, y and its command), padded to the
        # model's 4 as openpi pads every robot's actions to its model's dim.
        _tiny(
            "pi05_demo",
            vlm=GEMMA_VARIANTS["demo"],
            expert=GEMMA_VARIANTS["demo"],
            siglip=SIGLIP_VARIANTS["demo/12"],
            max_token_len=48,
            action_horizon=30,
            action_dim=4,
            asset_id="sim_pick_place",
            trained_task="pick-place",
        ),
    ]
)

# Camera resolutions (height, width) a server prepares ahead of time: common robot cameras.
DEFAULT_IMAGE_RESOLUTIONS: tuple[tuple[int, int], ...] = ((480, 640), (240, 320), (720, 1280), (256, 256))
DEFAULT_MODEL = "pi05_tiny"
# What `--demo` runs: the policy trained on the simulated arm's task, shipped below.
DEMO_MODEL = "pi05_demo"

# Tokenizers small enough to ship (built by `python -m configs.build_tiny_tokenizer`). The PaliGemma
# tokenizer of the full models is a file the user supplies.
_ASSETS = Path(__file__).resolve().parent / "assets"
SHIPPED_TOKENIZERS: dict[str, Path] = {"tiny": _ASSETS / "tiny_tokenizer.model"}

# Checkpoints small enough to ship, in openpi's layout (`params/`, `assets/<asset_id>/`): a config
# named here loads its checkpoint unless random weights are asked for. `python -m runtime.training`
# writes `pi05_demo`'s.
SHIPPED_CHECKPOINTS: dict[str, Path] = {"pi05_demo": _ASSETS / "pi05_demo"}


def model_config_names() -> list[str]:
    return sorted(_MODELS)


def get_model_config(name: str) -> ModelConfig:
    try:
        return _MODELS[name]
    except KeyError:
        close = difflib.get_close_matches(name, _MODELS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"unknown model config {name!r}.{hint} Known configs: {', '.join(model_config_names())}"
        ) from None
