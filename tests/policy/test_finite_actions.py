"""No NaN reaches a robot as a success: real-time chunking's leftover is checked in model space (the
engine and the model-free backend refuse the same ones, `bad_request` on the wire), and a row whose
actions still come out non-finite is answered `internal`, alone, while its batch mates are served.
The tiny model, one engine of batch 2 whose batches leave only when full (no timing involved)."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from asyncio import run

import numpy as np
import pytest

from configs import get_model_config
from policy.engine.images import Resizer
from policy.engine.inference import AsyncPi05Inference
from policy.engine.settings import EngineSettings
from policy.engine.validation import RequestValidator
from policy.normalize import Normalizer, Stats
from policy.prompts import Prompts
from policy.request import ChunkGuidance, EngineError, InferenceRequest
from policy.tokenizer import load_tokenizer
from runtime.policy_server.fixed_backend import FixedBackend
from tests.support.engine_requests import inference_request as _request
from tests.support.engine_requests import random_images as _images


@pytest.fixture(scope="module")
def pair_engine(jax_cache):
    """Batches of exactly two: the window never closes a batch, a second request does. One host
    thread, so requests take their batch rows in the order they were submitted."""
    eng = AsyncPi05Inference(
        EngineSettings(
            "pi05_tiny",
            max_batch=2,
            batch_buckets=(1, 2),
            batch_window_ms=600_000.0,
            deadline_s=600.0,
            host_workers=1,
            max_decoding_steps_limit=12,
            image_resolutions=(),
            compile_in_background=False,
        )
    )
    run(eng.start())
    yield eng
    run(eng.close())


def _leftover(value: float, dtype=np.float32, dim: int = 32) -> np.ndarray:
    """Ten steps of zeros but for `value` at step 3, dim 5."""
    leftover = np.zeros((10, dim), dtype)
    leftover[3, 5] = value
    return leftover


def _guided(leftover: np.ndarray, seed: int = 0, **options) -> InferenceRequest:
    request = _request(_images(seed), "pick up the pen", seed=seed, **({"generate_subtask": False} | options))
    return dataclasses.replace(request, guidance=ChunkGuidance(leftover, 2, 4, "exp", 5.0), return_model_actions=True)


@pytest.mark.parametrize(
    ("value", "dtype", "shown"),
    [
        (3.4e38, np.float32, "3.4e+38"),  # finite in float32: the adversary's NaN chunk
        (np.iinfo(np.uint64).max, np.uint64, "1.84467e+19"),
        (1e20, np.float64, "1e+20"),
        (1000.5, np.float32, "1000.5"),  # just past the bound
    ],
)
def test_a_leftover_beyond_the_models_range_is_refused_by_the_engine_and_the_fixed_backend(
    pair_engine, value, dtype, shown
):
    request = _guided(_leftover(value, dtype))
    message = rf"prev_actions\[3\]\[5\] is {re.escape(shown)}, .* in the model's normalized space: beyond \+-1000"
    before = sum(pair_engine.batch_counts.values())
    with pytest.raises(ValueError, match=message):
        pair_engine.check(request)
    with pytest.raises(ValueError, match=message):
        run(pair_engine.submit(request))
    assert sum(pair_engine.batch_counts.values()) == before
    with pytest.raises(ValueError, match=message):
        FixedBackend("pi05_tiny").check(request)


def test_a_leftover_at_the_bound_is_accepted_by_both(pair_engine):
    for value in (1000.0, -1000.0):
        request = _guided(_leftover(value))
        pair_engine.check(request)
        FixedBackend("pi05_tiny").check(request)


def test_leftovers_are_checked_in_model_space_through_the_norm_stats():
    """Robot units go through the stats the engine guides with: a value near a narrow dim's range is
    far outside the model's, and a large value of a wide dim is well inside it."""
    cfg = get_model_config("pi05_tiny")
    q01 = np.zeros(8)
    q99 = np.array([1e-3, 1e6, 1, 1, 1, 1, 1, 1])
    actions = Stats(mean=np.zeros(8), std=np.ones(8), q01=q01, q99=q99)
    normalizer = Normalizer(state=None, actions=actions)
    validator = RequestValidator(cfg, Prompts(cfg, load_tokenizer(cfg)), normalizer, Resizer(224, ()), 12, 4096)
    narrow = np.zeros((10, 8), np.float32)
    narrow[2, 0] = 1.0  # (1 - 0) / (1e-3 + 1e-6) * 2 - 1: about 1997 in model space
    with pytest.raises(ValueError, match=r"prev_actions\[2\]\[0\] is 1, 1997 in the model's normalized space"):
        validator.check(_guided(narrow))
    wide = np.zeros((10, 8), np.float32)
    wide[:, 1] = 5e5  # 0 in model space
    validator.check(_guided(wide))


async def _unchecked(engine: AsyncPi05Inference, request: InferenceRequest):
    """`engine.submit` without its validation: what a gap in it (the one closed above) lets reach the
    model. Admission, preparation, batching and answering are the engine's own."""
    ticket = engine._admit(request)
    engine._scheduler.expect(ticket)
    engine._pool.submit(engine._prepare, ticket)
    return await asyncio.wrap_future(ticket.future)


@pytest.mark.parametrize("two_stage", [False, True], ids=["actions", "subtask-then-actions"])
def test_a_non_finite_row_is_answered_internal_and_its_batch_mate_is_served(pair_engine, two_stage):
    """A leftover of 1e20 drives the guided flow to NaN (the exact VJP overflows float32). Before the
    fix the reply carried the NaN chunk as a success."""
    options = {"generate_subtask": True, "max_decoding_steps": 4} if two_stage else {}
    poisoned = _guided(np.full((10, 32), 1e20, np.float32), seed=1, **options)
    good = _guided(_leftover(0.5), seed=2, **options)
    companion = _guided(_leftover(0.25), seed=3, **options)
    before = pair_engine.batch_counts[("action", 2)]
    nonfinite = pair_engine.info()["nonfinite_rows"]

    async def together(first, second):
        return await asyncio.gather(
            _unchecked(pair_engine, first), _unchecked(pair_engine, second), return_exceptions=True
        )

    bad, served = run(together(poisoned, good))
    assert isinstance(bad, EngineError) and bad.code == "internal", bad
    assert "row 0 of its batch of 2" in str(bad) and "not finite" in str(bad)
    assert np.isfinite(served.actions).all() and np.isfinite(served.model_actions).all()
    # Its batch mate's chunk is the one it gets beside a finite row.
    _, reference = run(together(companion, good))
    np.testing.assert_allclose(served.model_actions, reference.model_actions, atol=1e-6, rtol=0)
    assert pair_engine.batch_counts[("action", 2)] == before + 2
    assert pair_engine.info()["nonfinite_rows"] == nonfinite + 1
    assert pair_engine.healthy
