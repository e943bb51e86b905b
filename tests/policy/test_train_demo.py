"""`runtime.training`: batches as the server builds its inputs, a loss that goes down, the same run
from the same seed, and a checkpoint the server's engine loads into the same actions."""

from __future__ import annotations

import asyncio
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import get_model_config
from policy.engine import phases
from policy.engine.inference import AsyncPi05Inference
from policy.engine.settings import EngineSettings
from policy.model import pi05
from policy.request import InferenceRequest, Observation, Options
from policy.tokenizer import load_tokenizer
from robots.sim import SimArm
from robots.tasks import PickPlaceTask
from runtime.training import train_demo as td


class _OneBatch:
    """Always the same batch: the loss on it must fall."""

    def __init__(self, batch):
        self.batch = batch

    def make(self, rng, batch_size):
        return self.batch


@pytest.fixture(scope="module")
def cfg():
    return get_model_config("pi05_demo")


@pytest.fixture(scope="module")
def setup(cfg):
    task = PickPlaceTask()
    demos = td.demonstrations(task, 4, cfg.action_horizon, seed=0, image_size=cfg.siglip.image_size)
    stats = td.norm_stats(demos)
    batches = td.BatchMaker(
        cfg, demos.frames, td.normalizer(stats), load_tokenizer(cfg), task, subtask_dropout=0.1, place_weight=5.0
    )
    return task, demos, stats, batches


def test_demonstrations_succeed_and_batches_hold_what_the_server_would_build(cfg, setup):
    _, demos, stats, batches = setup
    assert demos.successes == demos.episodes == 4
    assert {f.subtask.split()[0] for f in demos.frames} >= {"reach", "grasp", "move", "release"}
    assert set(stats["norm_stats"]) == {"state", "actions"} and len(stats["norm_stats"]["actions"]["q01"]) == 3
    batch = batches.make(np.random.default_rng(0), 40)
    assert batch.images.shape == (40, 3, 48, 48, 3) and batch.actions.shape == (40, cfg.action_horizon, 4)
    assert not batch.actions[..., 3].any()  # the arm's 3 action values, padded to the model's dim
    assert batch.text_tokens.shape == (10, cfg.max_token_len)  # a quarter of the rows pay for the text
    tok = batches.tokenizer
    places = 0
    for row in range(10):
        target = batch.text_tokens[row][batch.text_ar[row] & batch.text_mask[row]]
        assert target[-1] == tok.eos_id
        assert tok.decode(target).strip() in {f.subtask for f in demos.frames}
        # Scored positions are exactly those followed by a subtask token or EOS; the one followed by
        # the place a subtask names ("... at 3") weighs place_weight.
        weights = batch.text_loss[row]
        assert (weights > 0).sum() == len(target)
        heavy = np.flatnonzero(weights == 5.0)
        if tok.decode(target).strip()[-1].isdigit():
            places += 1
            assert len(heavy) == 1 and tok.decode([batch.text_tokens[row][heavy[0] + 1]]).strip().isdigit()
        else:
            assert len(heavy) == 0 and set(weights[weights > 0]) == {1.0}
        action_text = tok.decode(batch.action_tokens[row][batch.action_mask[row]][1:])
        assert action_text.startswith("Task: put the ") and action_text.endswith("Action: ")
    assert places > 0
    # A subtask without a place weighs every token alike.
    prompt, state = demos.frames[0].prompt, np.zeros(3, np.float32)
    weights = batches.text(prompt, state, "grasp the red block")[3]
    assert set(weights[weights > 0]) == {1.0}
    weights = batches.text(prompt, state, "reach for the red block at 2")[3]
    assert sorted(set(weights[weights > 0])) == [1.0, 5.0]


def test_the_loss_falls_on_a_fixed_batch_and_a_seed_repeats_the_run(cfg, setup):
    _, _, _, batches = setup
    one = _OneBatch(batches.make(np.random.default_rng(1), 4))
    result = td.train(cfg, one, steps=12, batch_size=4, seed=0, lr=3e-3, warmup=1, text_weight=1.0)
    losses = [r["loss"] for r in result.history]
    assert len(losses) == 12 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])
    # A round between steps (DAgger's) runs once, before its step, and leaves the run as it was.
    calls = []
    again = td.train(
        cfg, one, steps=12, batch_size=4, seed=0, lr=3e-3, warmup=1, text_weight=1.0,
        rounds={5: lambda step, params: calls.append((step, float(np.abs(params["action_in_proj"]["kernel"]).sum())))},
    )  # fmt: skip
    assert [r["loss"] for r in again.history] == losses
    assert len(calls) == 1 and calls[0][0] == 5 and np.isfinite(calls[0][1])


def test_the_checkpoint_loads_in_the_server_engine_and_gives_the_trained_actions(cfg, setup, tmp_path):
    task, _, stats, batches = setup
    # The settings of the test above: its compiled step serves again.
    result = td.train(cfg, batches, steps=12, batch_size=4, seed=2, lr=3e-3, warmup=1, text_weight=1.0)
    out = td.save(tmp_path / "ckpt", cfg, result.params, stats)
    assert json.loads((out / "assets" / "sim_pick_place" / "norm_stats.json").read_text()) == stats

    arm = SimArm(image_size=48, seed=9, task=task)
    obs = arm.observe()
    request = InferenceRequest(
        Observation(obs.images, obs.state),
        arm.prompt,
        Options(generate_subtask=False, low_level_prompt=arm.subtask, seed=11),
    )

    async def serve():
        settings = EngineSettings(
            "pi05_demo", checkpoint_dir=out, max_batch=1, batch_buckets=(1,), image_resolutions=(),
            compile_in_background=False,
        )  # fmt: skip
        engine = AsyncPi05Inference(settings)
        async with engine:
            return await engine.submit(request)

    served = asyncio.run(serve())

    norm = td.normalizer(stats)
    prompts = batches.prompts
    tokens, mask = prompts.tokenize(prompts.action_text(arm.prompt, norm.normalize_state(obs.state), arm.subtask))
    images = np.stack([obs.images[k] for k in cfg.image_keys])[None]
    model_obs = pi05.Observation(images, np.ones((1, 3), bool), tokens[None], mask[None])
    params = jax.tree.map(jnp.asarray, result.params)
    expected = phases.action_phase(params, model_obs, np.array([11], np.uint32), np.int32(cfg.num_steps), cfg=cfg)
    expected = norm.unnormalize_actions(np.asarray(expected)[0])
    assert served.actions.shape == (cfg.action_horizon, 3)  # the arm's 3: the norm stats' dims
    np.testing.assert_allclose(served.actions, expected[:, :3], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("flags", [["--place-weight", "0"], ["--fumble", "1.5"], ["--fumble", "-0.1"]])
def test_out_of_range_settings_are_refused_before_any_work(flags, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        td.main(["--out", str(tmp_path / "ckpt"), *flags])
    assert exit_info.value.code == 2
    assert "--place-weight must be > 0 and --fumble in [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "ckpt").exists()
