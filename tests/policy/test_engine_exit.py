"""A script that ends while the engine compiles in the background exits cleanly, every time.

Before: the README's engine example (start, one request, the script ends) exited with
"terminate called after throwing an instance of ''" (rc 134) in 2 of 6 runs: the daemon compile
thread, still inside XLA when the interpreter finalized, was killed on its way back into Python.
Now the process stops scheduling compiles at exit and waits for the one in progress, which the log
shows ("compiling stopped before ..."); a run without that line had no compile to stop, so at least
one run must show it.

The first bucket comes from the compilation cache (`small_engine` writes it) and the script writes
nothing there, so each run compiles its seven other buckets afresh, on the background thread.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import asyncio, logging, sys
import jax
import numpy as np
from policy.engine import jax_setup
from policy.engine.inference import AsyncPi05Inference
from policy.engine.settings import EngineSettings
from policy.request import InferenceRequest, Observation, Options

logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", force=True)
jax_setup.configure(sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1e9)  # read the cache, never write it
engine = AsyncPi05Inference(EngineSettings(
    "pi05_tiny", max_batch=8, batch_buckets=range(1, 9), max_decoding_steps_limit=4,
    image_resolutions=((240, 320), (480, 640)),
))
asyncio.run(engine.start())
images = {"base_0_rgb": np.zeros((240, 320, 3), np.uint8)}
observation = Observation(images, np.zeros(8, np.float32))
request = InferenceRequest(observation, "pick", Options(generate_subtask=False, seed=0))
print("actions", asyncio.run(engine.submit(request)).actions.shape, flush=True)
"""


@pytest.mark.parametrize("runs", [3, pytest.param(20, marks=pytest.mark.slow)])
def test_the_process_exits_cleanly_while_buckets_compile(small_engine, jax_cache, runs):
    stopped = 0
    for run in range(runs):
        result = subprocess.run(
            [sys.executable, "-c", SCRIPT, str(jax_cache)], capture_output=True, text=True, timeout=300
        )
        where = f"run {run}: rc {result.returncode}\n{result.stderr[-3000:]}"
        assert result.returncode == 0 and "terminate called" not in result.stderr, where
        assert "actions (50, 32)" in result.stdout, where
        assert "serving while batch buckets [2, 3, 4, 5, 6, 7, 8] compile in the background" in result.stderr, where
        # A background compile that fails at once (a race in JAX's lowering beside the first request,
        # KeyError on a Var in `lower`: 6 of 20 runs on a loaded 2-core CPU) leaves nothing to stop.
        stopped += "compiling stopped before" in result.stderr
    assert stopped > 0, f"no run of {runs} had a compile to stop at exit"
