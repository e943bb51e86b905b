"""Named configurations and small shipped assets.

A leaf package: it imports nothing from `policy`, `runtime`, `transport` or `robots`, so every
layer can resolve a configuration by name without pulling in JAX.
"""

from configs.model_config import GemmaConfig, ModelConfig, SiglipConfig
from configs.models import (
    DEFAULT_IMAGE_RESOLUTIONS,
    DEFAULT_MODEL,
    DEMO_MODEL,
    SHIPPED_CHECKPOINTS,
    SHIPPED_TOKENIZERS,
    get_model_config,
    model_config_names,
)

__all__ = [
    "DEFAULT_IMAGE_RESOLUTIONS",
    "DEFAULT_MODEL",
    "DEMO_MODEL",
    "SHIPPED_CHECKPOINTS",
    "SHIPPED_TOKENIZERS",
    "GemmaConfig",
    "ModelConfig",
    "SiglipConfig",
    "get_model_config",
    "model_config_names",
]
