"""Shared test fixtures: the openpi parity fixture and the tiny model loaded from it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

FIXTURE_DIR = Path(__file__).parent / "fixtures" / "openpi_pi05_tiny"


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    return FIXTURE_DIR


@pytest.fixture(scope="session")
def fixture_provenance() -> dict:
    return json.loads((FIXTURE_DIR / "config.json").read_text())["provenance"]


@pytest.fixture(scope="session")
def expected() -> dict[str, np.ndarray]:
    with np.load(FIXTURE_DIR / "expected.npz") as f:
        return dict(f)


@pytest.fixture(scope="session")
def fixture_inputs() -> dict[str, np.ndarray]:
    with np.load(FIXTURE_DIR / "inputs.npz") as f:
        return dict(f)


@pytest.fixture(scope="session")
def tiny_cfg():
    from configs import get_model_config

    return get_model_config("pi05_tiny")


@pytest.fixture(scope="session")
def tiny_params(tiny_cfg):
    import jax.numpy as jnp

    from policy.checkpoint import load_params

    return load_params(FIXTURE_DIR, tiny_cfg, dtype=jnp.float32)


@pytest.fixture(scope="session")
def fixture_obs(tiny_cfg):
    from policy.fixture import load_inputs

    return load_inputs(FIXTURE_DIR / "inputs.npz", tiny_cfg)


@pytest.fixture(scope="session")
def jax_cache(tmp_path_factory):
    """The process-wide compilation cache, as the server's `main` sets it: engines of the same
    configuration after the first compile from it."""
    from policy.engine import jax_setup

    path = tmp_path_factory.mktemp("jax_cache")
    jax_setup.configure(path)
    return path


@pytest.fixture(scope="session")
def engine(jax_cache):
    """One started tiny engine for the whole run (every bucket compiled: batching is deterministic).

    Its device thread is independent of event loops, so each test may drive it from its own
    `asyncio.run`.
    """
    import asyncio

    from policy.engine.inference import AsyncPi05Inference
    from policy.engine.settings import EngineSettings

    eng = AsyncPi05Inference(
        EngineSettings(
            "pi05_tiny",
            max_batch=4,
            batch_buckets=(1, 2, 4),
            batch_window_ms=30.0,
            # A request's wait is the tests' own business (they set `deadline` where they test it): on a
            # machine whose cores are taken, eight requests may queue longer than the default 5 s.
            deadline_s=120.0,
            max_decoding_steps_limit=12,
            image_resolutions=((480, 640),),
            compile_in_background=False,
        )
    )
    asyncio.run(eng.start())
    yield eng
    asyncio.run(eng.close())
