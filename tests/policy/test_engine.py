"""`AsyncPi05Inference` on the tiny model: the typed API, batching, the two stages, one SigLIP pass,
fault containment, deadlines, the bounded queue and shutdown."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import subprocess
import sys
from asyncio import run

import jax
import numpy as np
import pytest

from policy.engine import phases
from policy.engine.inference import AsyncPi05Inference
from policy.engine.settings import EngineSettings
from policy.model import pi05
from policy.request import (
    DeadlineExceeded,
    EngineBusy,
    EngineError,
    Observation,
)
from tests.support.engine_requests import CAMERAS
from tests.support.engine_requests import inference_request as _request
from tests.support.engine_requests import prepared_row as _row
from tests.support.engine_requests import random_images as _images


def test_infer_returns_every_field(engine):
    out = run(engine.submit(_request(state=[0.1, -0.2], max_decoding_steps=6, seed=3)))
    assert out.actions.shape == (50, 32) and out.actions.dtype == np.float32
    assert np.isfinite(out.actions).all()
    assert isinstance(out.subtask, str)
    assert 1 <= len(out.subtask_tokens) <= 6
    assert all(isinstance(t, int) for t in out.subtask_tokens)
    assert engine.tokenizer.decode(list(out.subtask_tokens)).strip() == out.subtask
    np.testing.assert_array_equal(out.state, np.float32([0.1, -0.2]))
    t = out.timing
    assert t["subtask_ms"] > 0 and t["action_ms"] > 0 and t["queue_ms"] >= 0
    assert t["total_ms"] >= t["subtask_ms"] + t["action_ms"]


def test_concurrent_calls_are_batched_and_match_alone(engine):
    requests = [
        _request(_images(i), f"task {i}", state=[i / 10], seed=100 + i, max_decoding_steps=8, temperature=0.7)
        for i in range(4)
    ]
    alone = [run(engine.submit(r)) for r in requests]
    before = engine.batch_counts[("action", 4)]

    async def together():
        return await asyncio.gather(*(engine.submit(r) for r in requests))

    batched = run(together())
    assert engine.batch_counts[("action", 4)] == before + 1  # the four went through as one batch
    for a, b in zip(alone, batched, strict=True):
        assert a.subtask_tokens == b.subtask_tokens
        np.testing.assert_allclose(a.actions, b.actions, atol=1e-5)
    # Different seeds and inputs give different chunks.
    assert np.abs(batched[0].actions - batched[1].actions).max() > 1e-3


def test_same_seed_same_result_and_fresh_seeds_differ(engine):
    a = run(engine.submit(_request(_images(1), "wipe the table", seed=5, max_decoding_steps=4)))
    b = run(engine.submit(_request(_images(1), "wipe the table", seed=5, max_decoding_steps=4)))
    c = run(engine.submit(_request(_images(1), "wipe the table", max_decoding_steps=4)))
    np.testing.assert_array_equal(a.actions, b.actions)
    assert np.abs(a.actions - c.actions).max() > 1e-3


def test_low_level_prompt_skips_decoding_and_conditions_actions(engine):
    images = _images(2)
    generated = run(engine.submit(_request(images, "fold the towel", seed=9, max_decoding_steps=5, temperature=0)))
    given = run(
        engine.submit(
            _request(images, "fold the towel", seed=9, low_level_prompt=generated.subtask, generate_subtask=False)
        )
    )
    assert given.timing["subtask_ms"] == 0.0
    assert given.subtask == generated.subtask
    # The same subtask text in the action prompt gives the same chunk, decoded or given (and the
    # decoded one came from reused image tokens, the given one from SigLIP on the action row).
    np.testing.assert_allclose(given.actions, generated.actions, atol=1e-6)
    other = run(
        engine.submit(
            _request(images, "fold the towel", seed=9, low_level_prompt="open the drawer", generate_subtask=False)
        )
    )
    assert np.abs(other.actions - given.actions).max() > 1e-4


def test_subtask_request_alone(engine):
    full = run(engine.submit(_request(_images(3), "stack the cups", seed=4, max_decoding_steps=7)))
    only = run(engine.submit(_request(_images(3), "stack the cups", kind="subtask", seed=4, max_decoding_steps=7)))
    assert only.subtask_tokens == full.subtask_tokens
    assert only.actions is None and only.timing["action_ms"] == 0.0
    assert only.timing["subtask_ms"] > 0


def test_two_stage_request_runs_siglip_once_with_the_two_pass_numbers(engine):
    """The action phase of a two-stage request reuses the subtask phase's image tokens: one
    executable with SigLIP runs (its conv is in the HLO), and the actions equal the two-pass path."""
    request = _request(_images(5), "open the drawer", state=[0.3, -0.5], seed=11, max_decoding_steps=6, temperature=0)
    before = dict(engine.executable_runs)
    out = run(engine.submit(request))
    ran = {k: v - before.get(k, 0) for k, v in engine.executable_runs.items() if v != before.get(k, 0)}
    with_siglip = {k: n for k, n in ran.items() if "convolution" in engine._executables.lower(k[0], k[1]).as_text()}
    assert with_siglip == {("subtask_start", 1): 1}, ran
    assert ran[("action_from_image_tokens", 1)] == 1 and ("action", 1) not in ran

    # Today's path: the subtask phase in one call, then the action phase with SigLIP again.
    params, cfg = engine._executables.params, engine.cfg
    prep = engine._prep
    normalized = engine.normalizer.normalize_state(np.float32([0.3, -0.5]))
    images = np.stack([prep.resizer(request.observation.images[k]) for k in CAMERAS])[None]
    tokens, mask = engine.prompts.tokenize(engine.prompts.subtask_text("open the drawer", normalized))
    obs = pi05.Observation(images, np.ones((1, 3), bool), tokens[None], mask[None])
    seeds = np.array([11], np.uint32)
    sub, lengths = phases.subtask_phase(params, obs, seeds, np.int32([6]), np.float32([0]), cfg, 12)
    ids = [int(t) for t in np.asarray(sub)[0, : int(lengths[0])]]
    assert tuple(ids) == out.subtask_tokens
    text = engine.prompts.action_text("open the drawer", normalized, engine.tokenizer.decode(ids).strip())
    tokens, mask = engine.prompts.tokenize(text)
    obs = dataclasses.replace(obs, tokens=tokens[None], token_mask=mask[None])
    two_pass = np.asarray(phases.action_phase(params, obs, seeds, np.int32(cfg.num_steps), cfg))[0]
    np.testing.assert_allclose(out.actions, two_pass, atol=1e-6, rtol=0)


def test_masked_camera_is_ignored_and_an_unmasked_one_is_not(engine):
    """Pixels of a camera the robot did not send cannot matter; changing a sent one does."""
    base = _images(4, ("base_0_rgb",), (480, 640, 3))
    wrist = _images(6, ("left_wrist_0_rgb",))
    out = run(engine.submit(_request(base | wrist, "go", generate_subtask=False, seed=1)))
    assert out.actions.shape == (50, 32)
    # The engine fills a missing camera with black and masks it: feed the model that camera with
    # other pixels under the same mask, directly, and the actions must not change.
    params, cfg = engine._executables.params, engine.cfg
    row = _row(engine, _request(base | wrist, "go", generate_subtask=False, seed=1))
    masked = row.images.copy()
    masked[2] = 255  # right wrist: not sent
    a = _actions(params, cfg, row, row.images)
    b = _actions(params, cfg, row, masked)
    np.testing.assert_allclose(a, out.actions, atol=1e-6)
    np.testing.assert_array_equal(a, b)
    unmasked = row.images.copy()
    unmasked[1] = 255 - unmasked[1]  # left wrist: sent
    assert np.abs(_actions(params, cfg, row, unmasked) - a).max() > 1e-4


def _actions(params, cfg, row, images):
    obs = pi05.Observation(images[None], row.image_mask[None], row.tokens[None], row.token_mask[None])
    seeds = np.array([row.seed], np.uint32)
    return np.asarray(phases.action_phase(params, obs, seeds, np.int32(cfg.num_steps), cfg))[0]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(images={"base_0_rgb": np.zeros((224, 224, 3), np.float32)}), "must be uint8"),
        (dict(images={"base_0_rgb": np.zeros((224, 224), np.uint8)}), r"shape \(H, W, 3\)"),
        (dict(images={"front": np.zeros((224, 224, 3), np.uint8)}), "unknown camera 'front'"),
        (dict(images={"base_0_rgb": np.zeros((5000, 10, 3), np.uint8)}), "larger than 4096"),
        (dict(images={}), "non-empty mapping"),
        (dict(prompt="   "), "prompt must be a non-empty string"),
        (dict(prompt="pick " * 300), "more than max_token_len 200"),
        (dict(state=[1.0] * 40), "state has 40 values"),
        (dict(state=[[1.0, 2.0]]), "1-D"),
        (dict(state=[float("nan")]), "NaN"),
        (dict(max_decoding_steps=0), r"max_decoding_steps must be in 1\.\.12"),
        (dict(max_decoding_steps=13), r"max_decoding_steps must be in 1\.\.12"),
        (dict(temperature=-1.0), "temperature must be finite and >= 0"),
        (dict(seed=-4), "seed must be an integer"),
        (dict(kind="both"), "kind must be one of"),
        (dict(priority="urgent"), "priority must be one of"),
    ],
)
def test_bad_input_raises_before_device_work(engine, change, message):
    before = sum(engine.batch_counts.values())
    kwargs = dict(images=_images(0), prompt="pick up the pen", max_decoding_steps=4) | change
    state = kwargs.pop("state", None)
    request = _request(**kwargs)
    if state is not None:  # as a transport would pass it, unconverted
        request = dataclasses.replace(request, observation=Observation(request.observation.images, state))
    with pytest.raises(ValueError, match=message):
        engine.check(request)
    with pytest.raises(ValueError, match=message):
        run(engine.submit(request))
    assert sum(engine.batch_counts.values()) == before


def test_prepare_images_resizes_once_and_a_prepared_image_passes_unchanged(engine):
    raw = _images(7, ("base_0_rgb",), (480, 640, 3))
    prepared = run(engine.prepare_images(raw))
    assert prepared["base_0_rgb"].shape == (224, 224, 3) and prepared["base_0_rgb"].dtype == np.uint8
    again = run(engine.prepare_images(prepared))
    assert again["base_0_rgb"] is prepared["base_0_rgb"]
    a = run(engine.submit(_request(raw, "go", generate_subtask=False, seed=2)))
    b = run(engine.submit(_request(prepared, "go", generate_subtask=False, seed=2)))
    np.testing.assert_array_equal(a.actions, b.actions)


def test_an_undeclared_resolution_compiles_with_a_log_line(engine, caplog):
    with caplog.at_level(logging.WARNING, logger="policy.engine.images"):
        run(engine.prepare_images(_images(8, ("base_0_rgb",), (100, 200, 3))))
        run(engine.prepare_images(_images(9, ("base_0_rgb",), (100, 200, 3))))
    compiles = [r for r in caplog.records if "undeclared camera resolution 100x200" in r.getMessage()]
    assert len(compiles) == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="policy.engine.images"):
        run(engine.prepare_images(_images(8, ("base_0_rgb",), (480, 640, 3))))  # declared
    assert not caplog.records


def test_a_failing_batch_fails_only_its_requests_and_the_engine_goes_on(engine, monkeypatch, caplog):
    real_run = engine._executables.run
    calls = []

    def run_failing_once(phase, b, *args):
        calls.append(phase)
        if len(calls) == 1:
            raise RuntimeError("injected device failure")
        return real_run(phase, b, *args)

    monkeypatch.setattr(engine._executables, "run", run_failing_once)
    with caplog.at_level(logging.ERROR, logger="policy.engine.worker"):
        with pytest.raises(EngineError, match="injected device failure") as failed:
            run(engine.submit(_request(generate_subtask=False, seed=1)))
    assert failed.value.code == "internal"
    assert any(r.exc_info and "injected device failure" in str(r.exc_info[1]) for r in caplog.records)
    assert engine.healthy
    out = run(engine.submit(_request(generate_subtask=False, seed=1)))
    assert out.actions.shape == (50, 32)


def test_a_failing_preparation_logs_the_clients_text_quoted(engine, monkeypatch, caplog):
    """A failure whose message carries what a client sent (here its prompt) must not forge log lines:
    it is logged quoted, and the traceback's frames without it."""
    prompt = "go\n2026-01-01 00:00:00 ERROR forged by a client\x1b[2J"

    def failing(ticket):
        raise RuntimeError(f"cannot prepare {ticket.request.prompt}")

    monkeypatch.setattr(engine._prep, "prepare", failing)
    with caplog.at_level(logging.DEBUG, logger="policy.engine.inference"):
        with pytest.raises(EngineError) as failed:
            run(engine.submit(_request(prompt=prompt, generate_subtask=False, seed=1)))
    assert failed.value.code == "internal"
    records = [r for r in caplog.records if r.name == "policy.engine.inference"]
    messages = [r.getMessage() for r in records]
    assert any(repr(f"cannot prepare {prompt}") in m for m in messages), messages
    assert not any("\n2026-01-01" in m or "\x1b" in m for m in messages), messages
    assert not any(r.exc_info for r in records)  # a formatted exception would repeat the message raw


def test_a_full_queue_answers_busy_at_once(engine, monkeypatch):
    monkeypatch.setattr(engine, "settings", dataclasses.replace(engine.settings, max_queue=1))

    async def two():
        return await asyncio.gather(
            engine.submit(_request(generate_subtask=False, seed=1)),
            engine.submit(_request(generate_subtask=False, seed=2)),
            return_exceptions=True,
        )

    first, second = run(two())
    assert first.actions.shape == (50, 32)
    assert isinstance(second, EngineBusy) and second.code == "busy"


def test_a_request_past_its_deadline_gets_deadline_exceeded(engine):
    import time

    request = dataclasses.replace(_request(generate_subtask=False, seed=1), deadline=time.monotonic() - 1)
    before = sum(engine.batch_counts.values())
    with pytest.raises(DeadlineExceeded) as err:
        run(engine.submit(request))
    assert err.value.code == "timeout"
    assert sum(engine.batch_counts.values()) == before


def test_close_answers_everything_queued(small_engine):
    async def go():
        tasks = [
            asyncio.ensure_future(small_engine.submit(_request(_images(i), seed=i, max_decoding_steps=4)))
            for i in range(4)
        ]
        await asyncio.sleep(0.05)  # the first is on the device, the others queued or being prepared
        await small_engine.close()
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = run(go())
    unavailable = [r for r in results if isinstance(r, EngineError) and r.code == "unavailable"]
    assert len(unavailable) >= 2, results
    assert all(isinstance(r, EngineError) or r.actions is not None for r in results)
    assert not small_engine.healthy
    with pytest.raises(EngineError, match="not serving"):
        run(small_engine.submit(_request(seed=1, max_decoding_steps=4)))


def test_a_dead_device_thread_makes_the_engine_unhealthy(small_engine, monkeypatch):
    assert small_engine.healthy

    def broken():
        raise RuntimeError("scheduler bug")

    monkeypatch.setattr(small_engine._scheduler, "_choose", lambda: broken())
    with pytest.raises(EngineError) as err:
        run(small_engine.submit(_request(generate_subtask=False, seed=1)))
    assert err.value.code == "internal"
    small_engine._thread.join(timeout=10)
    assert not small_engine.healthy


def test_two_engines_serve_in_one_process(engine, small_engine):
    async def both():
        return await asyncio.gather(
            engine.submit(_request(generate_subtask=False, seed=3)),
            small_engine.submit(_request(generate_subtask=False, seed=3)),
        )

    a, b = run(both())
    np.testing.assert_allclose(a.actions, b.actions, atol=1e-6)  # same random weights, same seed


_START_AND_CLOSE = """
import asyncio, sys
from policy.engine import jax_setup
from policy.engine.inference import AsyncPi05Inference
from policy.engine.settings import EngineSettings

async def main():
    settings = EngineSettings("pi05_tiny", max_batch=1, max_decoding_steps_limit=4, image_resolutions=())
    engine = AsyncPi05Inference(settings)
    await engine.start()
    await engine.close()

jax_setup.configure(sys.argv[1])
asyncio.run(main())
"""


def test_persistent_compile_cache_serves_a_second_start(tmp_path):
    # The compilation cache is process-wide, so each start is a fresh process, as a server restart is.
    cache = tmp_path / "cache"

    def start_and_list() -> list[str]:
        subprocess.run([sys.executable, "-c", _START_AND_CLOSE, str(cache)], check=True, timeout=300)
        return sorted(p.name for p in cache.rglob("*") if p.is_file())

    first = start_and_list()
    assert first, "the first start wrote nothing to the compilation cache"
    assert start_and_list() == first  # the second start found every executable there: nothing new compiled


def test_actions_are_unnormalized_with_the_robots_stats(tmp_path, jax_cache):
    """Per-dimension quantile stats: the engine's actions are the model's, mapped from [-1, 1] to
    [q01, q99] dimension by dimension, cut to the stats' 8 dimensions."""
    q01 = np.arange(8, dtype=np.float64) * 10 - 30
    q99 = q01 + np.arange(1, 9) * 3
    stats = {
        "state": {"mean": [0] * 8, "std": [1] * 8, "q01": [-2] * 8, "q99": [2] * 8},
        "actions": {"mean": [0] * 8, "std": [1] * 8, "q01": q01.tolist(), "q99": q99.tolist()},
    }
    (tmp_path / "norm_stats.json").write_text(json.dumps({"norm_stats": stats}))

    async def go():
        async with AsyncPi05Inference(
            EngineSettings(
                "pi05_tiny", max_batch=1, max_decoding_steps_limit=4, norm_stats=tmp_path, image_resolutions=()
            )
        ) as engine:
            with pytest.raises(ValueError, match="state has 7 values, this robot's norm stats expect 8"):
                engine.check(_request(state=[0.0] * 7))
            request = _request(state=[0.5] * 8, generate_subtask=False, seed=0)
            out = await engine.submit(request)
            model = _actions(
                engine._executables.params, engine.cfg, _row(engine, request), _row(engine, request).images
            )
            return out.actions, model

    actions, model = asyncio.run(go())
    assert actions.shape == (50, 8)
    expected = (model[:, :8] + 1.0) / 2.0 * (q99 - q01 + 1e-6) + q01
    np.testing.assert_allclose(actions, expected, rtol=1e-5, atol=1e-4)
    assert np.abs(actions - model[:, :8]).max() > 1.0  # the stats really moved them


def test_start_failure_is_reported(tmp_path):
    async def go():
        engine = AsyncPi05Inference(EngineSettings("pi05_tiny", checkpoint_dir=tmp_path / "missing"))
        await engine.start()

    with pytest.raises(ValueError, match="does not exist"):
        asyncio.run(go())


def test_jax_setup_is_not_touched_by_a_constructor(monkeypatch):
    monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
    cache = jax.config.jax_compilation_cache_dir
    AsyncPi05Inference(EngineSettings("pi05_tiny", max_batch=1))
    import os

    assert "XLA_PYTHON_CLIENT_PREALLOCATE" not in os.environ
    assert jax.config.jax_compilation_cache_dir == cache
