"""A Pi0.5 saved by LeRobot (tests/fixtures/lerobot_pi05_tiny, made by LeRobot's own code: see its
README) served through the path a user's checkpoint takes, and the refusals of a broken one.

Parity: the model's actions match LeRobot's to 1e-4 in float32, the processors' normalization
matches LeRobot's normalized state and robot-unit actions. Refusals: each is one line, raised while
the folder is described, with the safetensors reader made to fail if a weight were read.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from configs import DEMO_MODEL, get_model_config
from policy import fixture, replay, torch_checkpoint, torch_folder
from policy.checkpoint import CheckpointError
from policy.engine.inference import AsyncPi05Inference
from policy.engine.model_files import fetch_model_files
from policy.engine.settings import EngineSettings
from policy.model import pi05
from policy.request import InferenceRequest, Observation, Options

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "lerobot_pi05_tiny"
CHECKPOINT = FIXTURE / "checkpoint"


@pytest.fixture(scope="module")
def lerobot_expected() -> dict[str, np.ndarray]:
    with np.load(FIXTURE / "expected.npz") as f:
        return dict(f)


@pytest.fixture(scope="module")
def lerobot_inputs() -> dict[str, np.ndarray]:
    with np.load(FIXTURE / "inputs.npz") as f:
        return dict(f)


def _describe(path: Path = CHECKPOINT, **kwargs) -> torch_folder.TorchFolder:
    return torch_folder.describe(path, get_model_config(DEMO_MODEL), own_norm_stats=False, **kwargs)


def test_the_folder_brings_its_own_config_and_camera_names():
    described = _describe()
    cfg = described.cfg
    assert described.writer == "lerobot"
    assert (cfg.vlm, cfg.expert, cfg.siglip) == (get_model_config("pi05_tiny").vlm,) * 2 + (
        get_model_config("pi05_tiny").siglip,
    )
    assert (cfg.vocab_size, cfg.action_horizon, cfg.max_token_len, cfg.action_dim) == (1024, 10, 48, 32)
    assert cfg.image_keys == ("base_0_rgb", "left_wrist_0_rgb")
    assert described.camera_aliases == {
        "observation.images.front": "base_0_rgb",
        "front": "base_0_rgb",
        "observation.images.wrist": "left_wrist_0_rgb",
        "wrist": "left_wrist_0_rgb",
    }


def test_actions_match_lerobots_float32(lerobot_inputs, lerobot_expected):
    described = _describe()
    params = described.load_params(jnp.float32)
    obs, noise, num_steps = fixture.load_inputs(FIXTURE / "inputs.npz", described.cfg)
    actions = np.asarray(pi05.sample_actions_jit(params, obs, noise, jnp.int32(num_steps), described.cfg))
    err = float(np.abs(actions - lerobot_expected["actions"]).max())
    print(f"max abs error vs LeRobot's float32 actions: {err:.3e}")
    assert actions.shape == (1, 10, 32) and err <= 1e-4
    # The processors: LeRobot's normalized state in, its robot-unit actions out.
    normalizer = described.normalizer
    state = normalizer.normalize_state(lerobot_inputs["state"])
    np.testing.assert_allclose(state, lerobot_inputs["state_normalized"], atol=1e-5)
    robot = normalizer.unnormalize_actions(actions[..., :6])
    np.testing.assert_allclose(robot, lerobot_expected["actions_robot"], atol=1e-4)


def test_replay_runs_the_lerobot_folder(tmp_path, capsys, lerobot_expected):
    out = tmp_path / "out.npz"
    assert (
        replay.main([str(FIXTURE), "--checkpoint", str(CHECKPOINT), "--out", str(out), "--log-level", "WARNING"]) == 0
    )
    with np.load(out) as f:
        assert float(np.abs(f["actions"] - lerobot_expected["actions"]).max()) <= 1e-4
    assert "max abs error vs expected actions:" in capsys.readouterr().out


def _request(images: dict[str, np.ndarray]) -> InferenceRequest:
    state = np.linspace(-1, 1, 6, dtype=np.float32)
    return InferenceRequest(Observation(images, state), "pick up the pen", Options(generate_subtask=False, seed=0))


def test_the_engine_serves_it_under_the_fine_tunes_camera_names(jax_cache):
    """The default config names another model (the demo); the checkpoint's own config is served,
    and its cameras may be named by LeRobot's feature names, their short forms or the model's keys."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    other = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    engine = AsyncPi05Inference(
        EngineSettings(
            DEMO_MODEL,
            checkpoint_dir=CHECKPOINT,
            max_batch=1,
            max_decoding_steps_limit=4,
            image_resolutions=(),
            compile_in_background=False,
        )
    )

    async def go():
        async with engine:
            info = engine.info()
            by_short = (await engine.submit(_request({"front": image, "wrist": other}))).actions
            by_feature = await engine.submit(
                _request({"observation.images.front": image, "observation.images.wrist": other})
            )
            by_key = await engine.submit(_request({"base_0_rgb": image, "left_wrist_0_rgb": other}))
            with pytest.raises(ValueError, match=r"cameras 'front' and 'base_0_rgb' are the same camera"):
                engine.check(_request({"front": image, "base_0_rgb": image}))
            with pytest.raises(ValueError, match=r"unknown camera 'top'; .*'front'"):
                engine.check(_request({"top": image}))
            return info, by_short, by_feature.actions, by_key.actions

    info, by_short, by_feature, by_key = asyncio.run(go())
    assert info["config"].startswith("lerobot:") and info["image_keys"] == ["base_0_rgb", "left_wrist_0_rgb"]
    assert info["camera_aliases"]["front"] == "base_0_rgb" and info["action_horizon"] == 10
    assert info["action_dim"] == 6 and info["state_dim"] == 6
    assert by_short.shape == (10, 6) and np.isfinite(by_short).all()
    np.testing.assert_array_equal(by_short, by_feature)
    np.testing.assert_array_equal(by_short, by_key)


# ----------------------------------------------------------------------------- refusals


@pytest.fixture
def broken(tmp_path, monkeypatch) -> Path:
    """A copy of the fixture's folder to break, and a reader that fails if any weight is read."""
    folder = tmp_path / "ckpt"
    shutil.copytree(CHECKPOINT, folder)
    original = safe_open

    class HeaderOnly:
        def __init__(self, path, framework):
            self._file = original(path, framework=framework)

        def __enter__(self):
            self._file.__enter__()
            return self

        def __exit__(self, *exc):
            return self._file.__exit__(*exc)

        def keys(self):
            return self._file.keys()

        def get_slice(self, name):
            return self._file.get_slice(name)

        def get_tensor(self, name):
            raise AssertionError(f"a weight was read: {name}")

    monkeypatch.setattr(torch_checkpoint, "safe_open", HeaderOnly)
    return folder


def _tensors(folder: Path) -> dict[str, np.ndarray]:
    with safe_open(str(folder / "model.safetensors"), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _refused(folder: Path) -> str:
    settings = EngineSettings(DEMO_MODEL, checkpoint_dir=folder)
    with pytest.raises(CheckpointError) as refused:
        fetch_model_files(get_model_config(DEMO_MODEL), settings)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{folder}: "), message
    return message


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_a_missing_tensor_is_named_with_its_shape(broken):
    tensors = _tensors(broken)
    del tensors["model.paligemma_with_expert.gemma_expert.model.layers.2.mlp.up_proj.weight"]
    save_file(tensors, str(broken / "model.safetensors"))
    assert _refused(broken).endswith(
        "missing tensor model.paligemma_with_expert.gemma_expert.model.layers.2.mlp.up_proj.weight "
        "(config.json expects shape (128, 64))"
    )


def test_an_unexpected_tensor_is_named(broken):
    tensors = _tensors(broken)
    tensors["model.state_proj.weight"] = np.zeros((64, 32), ml_dtypes.bfloat16)  # a pi0 checkpoint's
    save_file(tensors, str(broken / "model.safetensors"))
    assert _refused(broken).endswith(
        "unexpected tensor model.state_proj.weight with shape (64, 32) (not part of a Pi0.5 of config.json)"
    )


def test_a_misshaped_tensor_names_both_shapes(broken):
    tensors = _tensors(broken)
    name = "model.paligemma_with_expert.paligemma.model.vision_tower.vision_model.embeddings.position_embedding.weight"
    tensors[name] = np.zeros((196, 32), np.float32)
    save_file(tensors, str(broken / "model.safetensors"))
    assert _refused(broken).endswith(
        f"tensor {name} has shape (196, 32) in the checkpoint, config.json expects (256, 32)"
    )


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"max_action_dim": 14}, "tensor model.action_in_proj.weight has shape (64, 32) in the checkpoint, "
         "config.json expects (64, 14)"),
        ({"paligemma_variant": "gemma_2b", "action_expert_variant": "gemma_300m"},
         "tensor model.action_in_proj.bias has shape (64,) in the checkpoint, config.json expects (1024,)"),
        ({"action_expert_variant": "gemma_300m"}, "the two Gemma towers must share depth: vlm has 4, expert has 18"),
        ({"paligemma_variant": "gemma_7b"}, "config.json's paligemma_variant 'gemma_7b' is not a known Gemma variant"),
        ({"type": "pi0"}, "a LeRobot 'pi0' policy, not a Pi0.5 ('pi05')"),
    ],
)  # fmt: skip
def test_a_config_that_contradicts_the_weights_is_refused(broken, changes, named):
    _edit_config(broken, **changes)
    assert named in _refused(broken)


@pytest.mark.parametrize(
    ("remove", "named"),
    [
        ("policy_postprocessor.json", "no policy_postprocessor.json, which holds the normalization statistics"),
        ("policy_preprocessor.json", "no policy_preprocessor.json, which holds the normalization statistics"),
        (
            "policy_preprocessor_step_2_normalizer_processor.safetensors",
            "policy_preprocessor.json names statistics file "
            "'policy_preprocessor_step_2_normalizer_processor.safetensors', not there",
        ),
    ],
)
def test_missing_normalization_files_are_refused(broken, remove, named):
    (broken / remove).unlink()
    message = _refused(broken)
    assert named in message and message.endswith("or pass --norm-stats")


def test_statistics_that_disagree_or_an_unserved_mode_are_refused(broken):
    stats_file = broken / "policy_preprocessor_step_2_normalizer_processor.safetensors"
    with safe_open(str(stats_file), framework="numpy") as f:
        stats = {k: f.get_tensor(k) for k in f.keys()}
    stats["action.q99"] = stats["action.q99"] + 1
    save_file(stats, str(stats_file))
    assert _refused(broken).endswith(
        "policy_preprocessor.json and policy_postprocessor.json hold different action statistics"
    )
    for name in ("policy_preprocessor.json", "policy_postprocessor.json"):
        text = (broken / name).read_text().replace('"STATE": "QUANTILES"', '"STATE": "MIN_MAX"')
        (broken / name).write_text(text)
    assert "normalizes STATE with MIN_MAX; this runtime serves QUANTILES, MEAN_STD or IDENTITY" in _refused(broken)


def test_cameras_named_like_the_models_keep_their_slot_in_lerobots_order():
    config = json.loads((CHECKPOINT / "config.json").read_text())
    config["input_features"] = {
        "observation.images.left_wrist_0_rgb": {"type": "VISUAL", "shape": [3, 224, 224]},
        "observation.images.top": {"type": "VISUAL", "shape": [3, 224, 224]},
        "observation.images.base_0_rgb": {"type": "VISUAL", "shape": [3, 224, 224]},
        "observation.state": {"type": "STATE", "shape": [6]},
    }
    from policy.lerobot_config import read_lerobot

    policy = read_lerobot(config, "x")
    assert policy.cfg.image_keys == ("left_wrist_0_rgb", "right_wrist_0_rgb", "base_0_rgb")
    assert policy.camera_aliases == {
        "observation.images.left_wrist_0_rgb": "left_wrist_0_rgb",
        "observation.images.top": "right_wrist_0_rgb",
        "top": "right_wrist_0_rgb",
        "observation.images.base_0_rgb": "base_0_rgb",
    }
