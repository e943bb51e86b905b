"""The layering holds: the import-linter contracts in pyproject.toml (`[tool.importlinter]`) are kept.

They say which way dependencies point: a robot installs `transport`, `robots` and `runtime.robot`
without JAX (`policy.request`, the typed request, is plain numpy); the model and engine know nothing
of serving; the fleet and the gateway never import the single server; no two sibling packages or
modules import each other. `lint-imports` in the repository root prints the same report.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The linter reads the import statements (no module is executed); in a child process so that the
# repository root it puts on sys.path, and its parsed graph, stay out of the test process.
_LINT = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True, no_logo=True))"


def test_the_import_contracts_are_kept():
    result = subprocess.run([sys.executable, "-c", _LINT], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
