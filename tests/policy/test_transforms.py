"""Tokenizer, prompt layouts, state discretization, normalization and image resizing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from configs import get_model_config
from policy import normalize, prompts
from policy.engine import images
from policy.model.pixels import to_model_range
from policy.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tiny_prompts():
    cfg = get_model_config("pi05_tiny")
    return prompts.Prompts(cfg, load_tokenizer(cfg))


def test_discretize_state_matches_openpi_bins():
    # openpi's own examples: 0.0 -> 128, 0.5 -> 192, -1.0 -> 0; below -1 -> -1; >= 1 -> 255.
    np.testing.assert_array_equal(
        prompts.discretize_state([0.0, 0.5, -1.0, -1.5, 1.0, 3.0]), [128, 192, 0, -1, 255, 255]
    )
    assert prompts.state_text(np.array([0.0, 0.5])) == "128 192"


def test_action_prompt_is_openpis_pi05_format(tiny_prompts):
    text = tiny_prompts.action_text("  pick_up the\npen ", np.array([0.0, -1.0]))
    assert text == "Task: pick up the pen, State: 128 0;\nAction: "
    assert tiny_prompts.action_text("go", None) == "Task: go;\nAction: "


def test_subtask_prompts_chain_into_the_action_prompt(tiny_prompts):
    state = np.array([0.5])
    sub = tiny_prompts.subtask_text("Pick up the flashcard", state)
    assert sub == "Task: Pick up the flashcard, State: 192;\nSubtask:"
    act = tiny_prompts.action_text("Pick up the flashcard", state, "move to table")
    assert act == sub + " move to table;\nAction: "


def test_state_left_out_when_the_config_has_no_discrete_state():
    cfg = get_model_config("pi05_tiny").replace(discrete_state_input=False)
    p = prompts.Prompts(cfg, load_tokenizer(cfg))
    assert p.action_text("go", np.array([0.3])) == "Task: go;\nAction: "


def test_tokenize_bos_no_eos_right_padded(tiny_prompts):
    tokens, mask = tiny_prompts.tokenize("Task: go;\nAction: ")
    ids = tiny_prompts.tokenizer.encode("Task: go;\nAction: ")
    assert tokens.shape == mask.shape == (200,)
    assert tokens[0] == 2 and mask.sum() == len(ids) + 1
    np.testing.assert_array_equal(tokens[1 : len(ids) + 1], ids)
    assert (tokens[len(ids) + 1 :] == 0).all() and 1 not in tokens.tolist()


def test_too_long_and_empty_prompts_raise(tiny_prompts):
    with pytest.raises(ValueError, match=r"the prompt is \d+ tokens, more than max_token_len 200"):
        tiny_prompts.tokenize("stack " * 400)
    with pytest.raises(ValueError, match="prompt is empty"):
        tiny_prompts.action_text(" \n ", None)


def test_tiny_tokenizer_round_trips_and_keeps_the_newline():
    tok = load_tokenizer(get_model_config("pi05_tiny"))
    text = "Task: Pick up the flashcard, State: 128 12;\nSubtask: move to table"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode([*tok.encode("stop here"), tok.eos_id, *tok.encode(" ignored")]) == "stop here"
    assert tok.decode(tok.encode("ünïcode ✓")) == "ünïcode ✓"  # byte fallback: any text encodes


def test_shipped_tiny_tokenizer_is_reproducible(tmp_path):
    from configs import SHIPPED_TOKENIZERS
    from configs.build_tiny_tokenizer import build

    rebuilt = build(tmp_path / "tiny.model")
    assert rebuilt.read_bytes() == SHIPPED_TOKENIZERS["tiny"].read_bytes()


def test_paligemma_tokenizer_is_a_setting_with_a_clear_error(tmp_path):
    cfg = get_model_config("pi05")
    with pytest.raises(FileNotFoundError, match=r"gs://big_vision/paligemma_tokenizer.model"):
        load_tokenizer(cfg)
    with pytest.raises(FileNotFoundError, match=r"tokenizer file not found: .*nope.model"):
        load_tokenizer(cfg, tmp_path / "nope.model")


def _stats_file(tmp_path, **over):
    stats = {
        "state": {"mean": [1.0, 2.0], "std": [2.0, 4.0], "q01": [-1.0, 0.0], "q99": [3.0, 10.0]},
        "actions": {"mean": [0.0, 0.0], "std": [1.0, 1.0], "q01": [-2.0, 0.0], "q99": [2.0, 1.0]},
    } | over
    path = tmp_path / "norm_stats.json"
    path.write_text(json.dumps({"norm_stats": stats}))
    return path


def test_quantile_normalization_is_openpis(tmp_path):
    n = normalize.load_norm_stats(_stats_file(tmp_path))
    s = n.normalize_state(np.array([1.0, 5.0]))
    np.testing.assert_allclose(s, [(1 + 1) / (4 + 1e-6) * 2 - 1, 5 / (10 + 1e-6) * 2 - 1], rtol=1e-6)
    # Unnormalize inverts, and dims beyond the stats pass through unchanged.
    model = np.array([[0.0, 1.0, 0.25]])
    np.testing.assert_allclose(n.unnormalize_actions(model), [[0.0, 1.0, 0.25]], atol=1e-5)
    model = np.array([[1.0, -1.0, 7.0]])
    np.testing.assert_allclose(n.unnormalize_actions(model), [[2.0, 0.0, 7.0]], atol=1e-5)


def test_zscore_mode(tmp_path):
    n = normalize.load_norm_stats(_stats_file(tmp_path), mode="zscore")
    np.testing.assert_allclose(n.normalize_state(np.array([3.0, 2.0])), [1.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(n.unnormalize_actions(np.array([[0.5, -1.0]])), [[0.5, -1.0]], atol=1e-5)


def test_norm_stats_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="norm stats not found"):
        normalize.load_norm_stats(tmp_path / "missing.json")
    bad = _stats_file(tmp_path, state={"mean": [0.0], "std": [1.0], "q01": [0.0]})
    with pytest.raises(ValueError, match="missing 'q99'"):
        normalize.load_norm_stats(bad)
    (tmp_path / "broken.json").write_text("{nope")
    with pytest.raises(ValueError, match="not valid JSON"):
        normalize.load_norm_stats(tmp_path / "broken.json")


def test_resize_with_pad_keeps_aspect_and_pads_black():
    img = np.full((100, 200, 3), 200, np.uint8)
    out = images.resize_with_pad(img, 224)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    # 100x200 -> 112x224, centred: 56 black rows above and below.
    assert (out[:56] == 0).all() and (out[168:] == 0).all()
    assert (out[56:168] == 200).all()
    same = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    assert images.resize_with_pad(same, 224) is same


def test_resize_downsamples_smoothly():
    """Bilinear with antialiasing: the columns at a hard edge get values in between (nearest
    neighbour would give only 0 and 255)."""
    img = np.zeros((448, 448, 3), np.uint8)
    img[:, 224:] = 255
    out = images.resize_with_pad(img, 224)
    assert (out[:, :100] == 0).all() and (out[:, 124:] == 255).all()
    edge = out[0, 108:116, 0]
    assert ((edge > 0) & (edge < 255)).any(), edge


@pytest.mark.parametrize("shape", [(480, 640), (720, 1280), (100, 200), (300, 224), (150, 150)])
def test_resize_matches_openpi_client_within_one(shape):
    from openpi_client import image_tools

    rng = np.random.default_rng(shape[0])
    smooth = np.stack(np.meshgrid(np.linspace(0, 255, shape[1]), np.linspace(0, 255, shape[0])), -1)
    for img in (
        rng.integers(0, 256, (*shape, 3), dtype=np.uint8),
        np.concatenate([smooth, smooth[..., :1]], -1).astype(np.uint8),
    ):
        ours = images.resize_with_pad(img, 224)
        theirs = image_tools.resize_with_pad(img, 224, 224)
        assert ours.shape == theirs.shape == (224, 224, 3)
        assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1
        resizer = images.Resizer(224, declared=[shape])
        resizer.warm()
        np.testing.assert_array_equal(resizer(img), ours)  # the engine's compiled resize, same numbers


def test_to_model_range_is_openpis_conversion():
    x = np.array([[[0, 128, 255]]], np.uint8)
    np.testing.assert_array_equal(to_model_range(x), x.astype(np.float32) / 255.0 * 2.0 - 1.0)
