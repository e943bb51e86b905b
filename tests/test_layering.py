"""Dependencies point one way: a robot installs `transport` and `robots` without JAX (`policy.request`,
the typed request, is plain numpy)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_BLOCK_AND_IMPORT = """
import importlib, sys

class BlockHeavy:
    def find_spec(self, name, path=None, target=None):
        # `policy.request` is the one model module the robot side shares: the typed request, no JAX.
        if name.split(".")[0] in ("jax", "jaxlib", "orbax") or (
            name.startswith("policy.") and name != "policy.request"
        ):
            raise ImportError(f"{name} imported from the robot side")

sys.meta_path.insert(0, BlockHeavy())
for module in sys.argv[1:]:
    importlib.import_module(module)
print("imported", len(sys.argv) - 1)
"""


def _modules(package: str) -> list[str]:
    return [f"{package}.{m.name}" for m in pkgutil.iter_modules([str(ROOT / package)])]


def test_transport_robots_and_the_control_loop_import_without_jax():
    modules = [*_modules("transport"), *_modules("robots"), "runtime.robot.chunk_buffer", "runtime.robot.control_loop"]
    result = subprocess.run(
        [sys.executable, "-c", _BLOCK_AND_IMPORT, *modules], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"imported {len(modules)}"
