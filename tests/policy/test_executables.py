"""`Executables.compile`: a lowering that JAX's tracing fails with a `KeyError` is tried again.

The failure is a race inside JAX on the background compile thread (about one run in ten on a loaded
2-core CPU); it is simulated here by a `lower` that fails the given number of times first."""

from __future__ import annotations

import logging
import threading

import jax
import pytest

from configs import get_model_config
from policy.engine.executables import LOWERING_ATTEMPTS, Executables
from policy.engine.settings import EngineSettings
from policy.model import params


@pytest.fixture(scope="module")
def executables(jax_cache) -> Executables:
    cfg = get_model_config("pi05_tiny")
    settings = EngineSettings("pi05_tiny", max_batch=1, max_decoding_steps_limit=4, image_resolutions=())
    return Executables(cfg, params.init_params(cfg, seed=0), jax.devices()[0], settings)


def _failing_first(monkeypatch, x: Executables, failures: int) -> list[str]:
    calls: list[str] = []
    real = Executables.lower

    def lower(self, phase, b):
        calls.append(phase)
        if calls.count(phase) <= failures:
            raise KeyError("Var(id=1):float32[256]")
        return real(self, phase, b)

    monkeypatch.setattr(Executables, "lower", lower)
    return calls


def test_a_lowering_that_fails_inside_jax_is_tried_again(executables, monkeypatch, caplog):
    calls = _failing_first(monkeypatch, executables, failures=LOWERING_ATTEMPTS - 1)
    with caplog.at_level(logging.WARNING, logger="policy.engine.executables"):
        executables.compile([1], threading.Event())
    assert executables.ready_buckets() == (1,)
    assert calls.count("action") == LOWERING_ATTEMPTS
    assert caplog.text.count("failed inside JAX") == 4 * (LOWERING_ATTEMPTS - 1)


def test_a_lowering_that_keeps_failing_is_reported(executables, monkeypatch):
    _failing_first(monkeypatch, executables, failures=LOWERING_ATTEMPTS)
    with pytest.raises(KeyError):
        Executables(executables.cfg, executables.params, executables.device, EngineSettings("pi05_tiny")).compile(
            [1], threading.Event()
        )
