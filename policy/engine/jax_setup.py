"""Process-wide JAX settings, applied once by a serving process's `main` before any engine starts.

They are global to the process (one compilation cache, one allocator policy), so no engine
constructor sets them: two engines on two devices share one process and one configuration.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jax

log = logging.getLogger(__name__)

DEFAULT_COMPILE_CACHE = Path("~/.cache/pi05-runtime/jax").expanduser()


def configure(
    compile_cache_dir: str | Path | None = DEFAULT_COMPILE_CACHE, preallocate_gpu_memory: bool = False
) -> None:
    """Persistent compilation cache (None: off) and GPU memory preallocation.

    The cache turns a restart's compiles (seconds per executable for the full model) into reads.
    Preallocation is off by default so that a server shares its GPU with other processes; it only
    takes effect before JAX starts its backend, so call this first.
    """
    if not preallocate_gpu_memory:
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if compile_cache_dir is None:
        return
    path = Path(compile_cache_dir).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    log.info("JAX compilation cache at %s", path)
