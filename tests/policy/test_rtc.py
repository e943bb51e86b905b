"""Real-time chunking on the tiny model: the prefix weights, guidance toward the robot's leftover in
model space and in robot units, exactness with guidance off, the exact VJP against the identity
approximation, guided and plain rows in one compiled batch, and the typed rejection of bad guidance."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
from asyncio import run

import jax
import numpy as np
import pytest

from policy.engine import phases
from policy.engine.inference import AsyncPi05Inference
from policy.engine.settings import EngineSettings
from policy.model import pi05, rtc
from policy.normalize import Normalizer, Stats
from policy.request import ChunkGuidance
from tests.support.engine_requests import inference_request as _request
from tests.support.engine_requests import prepared_row as _row
from tests.support.engine_requests import random_images as _images

H = 50  # the tiny model's horizon
D = 5  # inference delay of the tests' guidance
# Largest |guided - leftover| over the first D steps in model space, beta 10, "zeros" schedule, 10 flow
# steps; the leftover is another seed's chunk, over 1 away unguided. Measured on CPU: 0.061 with the
# exact VJP (0.061 for a two-stage request too), 0.031 with the identity approximation (0.031 of each
# dim's half-range in robot units); beta 5 leaves 0.24 and 0.16, beta 20 0.057 and 0.027.
TOL_VJP, TOL_IDENTITY = 0.1, 0.05
# Action stats of the identity engine: 8 robot dims, half-ranges (q99 - q01) / 2 from 1.5 to 12.
Q01 = np.arange(8, dtype=np.float64) * 10 - 30
Q99 = Q01 + np.arange(1, 9) * 3


@pytest.fixture(scope="module")
def identity_engine(jax_cache, tmp_path_factory):
    """A batch-1 engine guiding with the identity approximation, with 8-dim action stats (robot
    units differ from model space). Its subtask phases come from the compilation cache."""
    folder = tmp_path_factory.mktemp("rtc_stats")
    stats = {
        "state": {"mean": [0] * 8, "std": [1] * 8, "q01": [-2] * 8, "q99": [2] * 8},
        "actions": {"mean": [0] * 8, "std": [1] * 8, "q01": Q01.tolist(), "q99": Q99.tolist()},
    }
    (folder / "norm_stats.json").write_text(json.dumps({"norm_stats": stats}))
    eng = AsyncPi05Inference(
        EngineSettings(
            "pi05_tiny",
            max_batch=1,
            max_decoding_steps_limit=12,
            norm_stats=folder,
            image_resolutions=(),
            compile_in_background=False,
            rtc_method="identity",
        )
    )
    run(eng.start())
    yield eng
    run(eng.close())


@contextlib.contextmanager
def no_compiles():
    """Fails if JAX traces or compiles anything inside the block (the engine runs AOT executables)."""
    events: list[str] = []

    def listener(event: str, _secs: float, **_kwargs) -> None:
        if event.startswith("/jax/core/compile/"):
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert not events, events


def _guided(seed: int, leftover: np.ndarray, schedule="zeros", beta=10.0):
    """A request of image 0 guided toward `leftover` with delay and horizon D, the chunk in model space asked."""
    guidance = ChunkGuidance(
        leftover, inference_delay=D, execute_horizon=D, schedule=schedule, max_guidance_weight=beta
    )
    request = _request(_images(0), "pick up the pen", seed=seed, generate_subtask=False)
    return dataclasses.replace(request, guidance=guidance, return_model_actions=True)


def _leftover(engine, executed: int = 10, n: int = 20):
    """Another seed's chunk as the robot's leftover after `executed` steps: (robot units, model space)."""
    prev = run(
        engine.submit(
            dataclasses.replace(_request(_images(0), seed=1, generate_subtask=False), return_model_actions=True)
        )
    )
    return prev.actions[executed : executed + n], prev.model_actions[executed : executed + n]


def _unguided(engine, request) -> np.ndarray:
    """`phases.action_phase` without a guide: the plain sampler, jitted on its own."""
    row = _row(engine, request)
    obs = pi05.Observation(row.images[None], row.image_mask[None], row.tokens[None], row.token_mask[None])
    seeds = np.array([row.seed], np.uint32)
    return np.asarray(
        phases.action_phase(engine._executables.params, obs, seeds, np.int32(engine.num_steps), engine.cfg)
    )[0]


def _guided_direct(engine, request, method) -> np.ndarray:
    """The request's row through `phases.action_phase` jitted on its own, guided by `method`."""
    row = _row(engine, request)
    obs = pi05.Observation(row.images[None], row.image_mask[None], row.tokens[None], row.token_mask[None])
    seeds = np.array([row.seed], np.uint32)
    guide = rtc.Guide(row.guide[None], row.guide_weights[None], np.float32([row.guide_beta]))
    params, steps, cfg = engine._executables.params, np.int32(engine.num_steps), engine.cfg
    return np.asarray(phases.action_phase(params, obs, seeds, steps, cfg, guide, method))[0]


# ---------------------------------------------------------------------------- the weights


def test_prefix_weights_by_schedule():
    # The paper's example: start 2, end 6, total 10.
    linear = np.array([1, 1, 0.8, 0.6, 0.4, 0.2, 0, 0, 0, 0])
    np.testing.assert_allclose(rtc.prefix_weights(2, 6, 10, "linear"), linear, atol=1e-7)
    np.testing.assert_allclose(rtc.prefix_weights(2, 6, 10, "exp"), linear * np.expm1(linear) / (math.e - 1), atol=1e-7)
    np.testing.assert_array_equal(rtc.prefix_weights(2, 6, 10, "ones"), [1, 1, 1, 1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(rtc.prefix_weights(2, 6, 10, "zeros"), [1, 1, 0, 0, 0, 0, 0, 0, 0, 0])
    # `end` wins over `start`: nothing past it is weighted, and end 0 weights nothing.
    np.testing.assert_array_equal(rtc.prefix_weights(4, 2, 6, "zeros"), [1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(rtc.prefix_weights(4, 2, 6, "linear"), [1, 1, 0, 0, 0, 0])
    for schedule in ("exp", "linear", "ones", "zeros"):
        assert not rtc.prefix_weights(3, 0, 8, schedule).any()
        assert rtc.prefix_weights(3, 7, 8, schedule).dtype == np.float32
    with pytest.raises(ValueError, match="unknown prefix-weight schedule"):
        rtc.prefix_weights(1, 2, 3, "cosine")


def test_guidance_weight_is_the_papers_clipped_to_beta():
    beta = np.float32([0.0, 1.5, 5.0, 100.0])
    np.testing.assert_array_equal(rtc.guidance_weight(1.0, beta), beta)  # infinite at the noise end
    # tau = 0.5 (t = 0.5): 1 * (0.25 + 0.25) / 0.25 = 2; tau = 0.1 (t = 0.9): (1/9) * 0.82 / 0.01.
    np.testing.assert_allclose(rtc.guidance_weight(0.5, beta), [0.0, 1.5, 2.0, 2.0], rtol=1e-6)
    np.testing.assert_allclose(rtc.guidance_weight(0.1, beta), [0.0, 1.5, 5.0, 0.82 / 0.09], rtol=1e-5)


def test_host_columns_weigh_the_delay_and_stop_at_the_leftovers_end(engine):
    prep = engine._prep
    leftover = np.linspace(-1, 1, 20 * 32, dtype=np.float32).reshape(20, 32)
    guide, weights, beta = prep.guide(ChunkGuidance(leftover, 3, 10, "linear", 7.0))
    assert guide.shape == (H, 32) and guide.dtype == np.float32 and beta == np.float32(7.0)
    np.testing.assert_array_equal(guide[:20], leftover)  # no stats: model space is robot units
    np.testing.assert_array_equal(prep.guide(ChunkGuidance(leftover.tolist(), 3, 10, "linear", 7.0))[0], guide)
    assert not guide[20:].any()
    # end = min(H - s, n) = min(40, 20) = 20.
    np.testing.assert_array_equal(weights, rtc.prefix_weights(3, 20, H, "linear"))
    assert weights[:3].tolist() == [1, 1, 1] and 0 < weights[19] < 1 and not weights[20:].any()
    # A short leftover ends the weights early; H - s ends them when it comes first.
    _, weights, _ = prep.guide(ChunkGuidance(leftover[:2], 3, 3, "ones"))
    assert weights[:2].tolist() == [1, 1] and not weights[2:].any()
    full = np.zeros((H, 32), np.float32)
    _, weights, _ = prep.guide(ChunkGuidance(full, 2, 45, "ones"))
    assert weights[:5].all() and not weights[5:].any()
    # Weights that are all zero switch guidance off for the row (it samples unguided).
    _, weights, beta = prep.guide(ChunkGuidance(leftover, 0, 5, "zeros", 5.0))
    assert not weights.any() and beta == 0
    guide, weights, beta = prep.guide(None)
    assert not guide.any() and not weights.any() and beta == 0


@pytest.mark.parametrize("mode", ["quantile", "zscore"])
def test_normalize_actions_inverts_unnormalize_and_pads_with_zeros(mode):
    stats = Stats(mean=Q01 + 5, std=np.arange(1, 9) * 0.5, q01=Q01, q99=Q99)
    normalizer = Normalizer(state=None, actions=stats, mode=mode)
    robot = np.random.default_rng(0).uniform(Q01, Q99, (20, 8)).astype(np.float32)
    model = normalizer.normalize_actions(robot, 32)
    assert model.shape == (20, 32) and model.dtype == np.float32 and not model[:, 8:].any()
    np.testing.assert_allclose(normalizer.unnormalize_actions(model)[:, :8], robot, rtol=1e-6, atol=1e-5)
    back = normalizer.normalize_actions(normalizer.unnormalize_actions(model)[:, :8], 32)
    np.testing.assert_allclose(back, model, atol=1e-6)
    with pytest.raises(ValueError, match="more than the model's 4"):
        normalizer.normalize_actions(robot, 4)


# ---------------------------------------------------------------------------- the engine


def test_guidance_off_equals_the_unguided_sampler_exactly(engine):
    """beta = 0, weights that are all zero, and no guidance at all: bit for bit the plain sampler
    (a batch without a guided row takes `pi05.denoise` itself)."""
    _, leftover = _leftover(engine)
    plain_request = dataclasses.replace(_request(_images(0), seed=0, generate_subtask=False), return_model_actions=True)
    reference = _unguided(engine, plain_request)
    requests = [
        plain_request,
        _guided(0, leftover, beta=0.0),
        dataclasses.replace(_guided(0, leftover), guidance=ChunkGuidance(leftover, 0, 5, "zeros", 10.0)),
    ]
    for request in requests:
        out = run(engine.submit(request))
        np.testing.assert_array_equal(out.model_actions, reference)
        np.testing.assert_array_equal(out.actions, reference)  # no stats: robot units are model space
    assert run(engine.submit(_request(_images(0), seed=0, generate_subtask=False))).model_actions is None


def test_large_beta_makes_the_first_d_actions_continue_the_leftover(engine):
    robot, model = _leftover(engine)
    unguided = run(engine.submit(_guided(0, robot, beta=0.0))).model_actions
    assert np.abs(unguided[:D] - model[:D]).max() > 1.0  # another seed's chunk: far apart unguided
    out = run(engine.submit(_guided(0, robot)))
    err = np.abs(out.model_actions[:D] - model[:D]).max()
    assert err < TOL_VJP, err
    # The "zeros" schedule only holds the first D steps: the rest stays the model's own.
    assert np.abs(out.model_actions[D:20] - model[D:20]).max() > 1.0


def test_guidance_in_robot_units_through_the_norm_stats(identity_engine):
    """The leftover comes in robot units; the engine normalizes it with the stats it unnormalizes
    with, so the first D actions land on it in robot units too (tolerance scaled by each dim's
    half-range, the factor from model space to robot units)."""
    robot, model = _leftover(identity_engine)
    assert robot.shape == (20, 8) and model.shape == (20, 32)
    out = run(identity_engine.submit(_guided(0, robot)))
    assert out.actions.shape == (H, 8) and out.model_actions.shape == (H, 32)
    np.testing.assert_allclose(identity_engine.normalizer.unnormalize_actions(out.model_actions)[:, :8], out.actions)
    err_model = np.abs(out.model_actions[:D, :8] - model[:D, :8]).max()
    err_robot = (np.abs(out.actions[:D] - robot[:D]) / ((Q99 - Q01) / 2)).max()
    assert err_model < TOL_IDENTITY and err_robot < TOL_IDENTITY, (err_model, err_robot)
    # The padded dims are guided toward openpi's padding value, 0, not toward the old chunk's.
    assert np.abs(out.model_actions[:D, 8:]).max() < TOL_IDENTITY


def test_vjp_and_identity_differ_and_both_run_compiled(engine, identity_engine):
    """Each engine runs its method in its AOT executable: the identity engine's chunk is the identity
    approximation's (jitted on its own here), the VJP engine's is guided just as closely (above) but
    differs from it. Both engines hold the same random weights."""
    assert engine.info()["rtc_method"] == "vjp" and identity_engine.info()["rtc_method"] == "identity"
    robot, _ = _leftover(engine)
    request = _guided(0, robot)
    with no_compiles():
        before = engine.executable_runs[("action", 1)]
        vjp = run(engine.submit(request)).model_actions
        assert engine.executable_runs[("action", 1)] == before + 1
    assert np.abs(vjp - _guided_direct(engine, request, "identity")).max() > 1e-2  # the Jacobian matters
    robot8, _ = _leftover(identity_engine)
    request = _guided(0, robot8)
    with no_compiles():
        before = identity_engine.executable_runs[("action", 1)]
        identity = run(identity_engine.submit(request)).model_actions
        assert identity_engine.executable_runs[("action", 1)] == before + 1
    np.testing.assert_allclose(identity, _guided_direct(identity_engine, request, "identity"), atol=1e-5)


def test_a_guided_row_and_a_plain_row_in_one_batch_equal_their_solo_runs(engine):
    robot, _ = _leftover(engine)
    guided = _guided(0, robot)
    plain = dataclasses.replace(
        _request(_images(3), "open the drawer", seed=4, generate_subtask=False), return_model_actions=True
    )
    alone = [run(engine.submit(r)).model_actions for r in (guided, plain)]
    before = engine.batch_counts[("action", 2)]

    async def together():
        return await asyncio.gather(engine.submit(guided), engine.submit(plain))

    with no_compiles():
        batched = [r.model_actions for r in run(together())]
    assert engine.batch_counts[("action", 2)] == before + 1  # one batch of both
    # Measured 7e-7 for either row: the batch size changes XLA's arithmetic a little, as for plain
    # batches (`test_engine`); the plain row pays no guidance (its beta is 0).
    for a, b in zip(alone, batched, strict=True):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)


def test_a_two_stage_request_honours_guidance(engine):
    robot, model = _leftover(engine)
    one_stage = _guided(0, robot)
    options = dataclasses.replace(one_stage.options, generate_subtask=True, max_decoding_steps=4)
    request = dataclasses.replace(one_stage, options=options)
    before = dict(engine.executable_runs)
    out = run(engine.submit(request))
    assert engine.executable_runs[("action_from_image_tokens", 1)] == before.get(("action_from_image_tokens", 1), 0) + 1
    assert out.subtask_tokens
    err = np.abs(out.model_actions[:D] - model[:D]).max()
    assert err < TOL_VJP, err


def _bad(leftover=None, d=D, s=D, schedule="exp", beta=5.0):
    leftover = np.zeros((20, 32), np.float32) if leftover is None else leftover
    return ChunkGuidance(leftover, d, s, schedule, beta)


@pytest.mark.parametrize(
    ("guidance", "message"),
    [
        (_bad(np.zeros(32, np.float32)), r"prev_actions must be \(n, 32\)"),
        (_bad(np.zeros((0, 32), np.float32)), r"1 <= n <= 50"),
        (_bad(np.zeros((51, 32), np.float32)), r"got shape \(51, 32\)"),
        (_bad(np.zeros((20, 7), np.float32)), r"prev_actions must be \(n, 32\)"),
        (_bad(np.full((20, 32), np.nan, np.float32)), "prev_actions contains NaN"),
        (_bad(np.array([["a"] * 32] * 20)), "prev_actions must be an array of numbers"),
        (_bad([[0.0] * 32] * 19 + [[0.0]]), "prev_actions must be an array of numbers"),
        (_bad(d=-1), r"inference_delay must be in 0\.\.25"),
        (_bad(d=26, s=26), r"inference_delay must be in 0\.\.25"),
        (_bad(d=2.0), "inference_delay must be an integer"),
        (_bad(d=10, s=9), r"execute_horizon must be in .* = 10\.\.40, got 9"),
        (_bad(d=10, s=41), r"execute_horizon must be in .* = 10\.\.40, got 41"),
        (_bad(d=0, s=0), r"= 1\.\.50, got 0"),
        (_bad(schedule="cosine"), "schedule must be one of"),
        (_bad(beta=-1.0), r"max_guidance_weight must be in \[0, 100\]"),
        (_bad(beta=101.0), r"max_guidance_weight must be in \[0, 100\]"),
        (_bad(beta=float("inf")), r"max_guidance_weight must be in \[0, 100\]"),
        (_bad(beta="5"), "max_guidance_weight must be a number"),
        ("not guidance", "guidance must be a ChunkGuidance"),
    ],
)
def test_bad_guidance_raises_before_device_work(engine, guidance, message):
    before = sum(engine.batch_counts.values())
    request = dataclasses.replace(_request(_images(0), seed=1, generate_subtask=False), guidance=guidance)
    with pytest.raises(ValueError, match=message):
        engine.check(request)
    with pytest.raises(ValueError, match=message):
        run(engine.submit(request))
    assert sum(engine.batch_counts.values()) == before


def test_guidance_on_a_subtask_request_is_refused(engine):
    request = dataclasses.replace(_request(_images(0), kind="subtask", max_decoding_steps=4), guidance=_bad())
    with pytest.raises(ValueError, match="subtask-only request takes none"):
        engine.check(request)


def test_the_rtc_method_is_checked():
    with pytest.raises(ValueError, match="rtc_method must be one of"):
        EngineSettings("pi05_tiny", rtc_method="exact")
