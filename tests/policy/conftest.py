"""A small engine per test that needs to break or close its engine (the shared one and the
compilation cache are the root conftest's), and a download cache of the test's own."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """The download cache, empty, with an empty openpi cache beside it."""
    from policy import download

    monkeypatch.setenv(download.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("OPENPI_DATA_HOME", str(tmp_path / "openpi"))
    return tmp_path / "cache"


@pytest.fixture
def small_engine(jax_cache):
    """A batch-1 engine a test may break or close (compiles come from the cache after the first)."""
    from policy.engine.inference import AsyncPi05Inference
    from policy.engine.settings import EngineSettings

    eng = AsyncPi05Inference(
        EngineSettings(
            "pi05_tiny", max_batch=1, max_decoding_steps_limit=4, image_resolutions=(), compile_in_background=False
        )
    )
    asyncio.run(eng.start())
    yield eng
    asyncio.run(eng.close())
