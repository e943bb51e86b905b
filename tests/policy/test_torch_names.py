"""The PyTorch <-> openpi name table (`policy.torch_names`), read both ways.

Round trips alone would pass a table that transposes wrongly on both sides, so each kind of rule
is also held against what PyTorch computes with the tensor (a Linear is x @ W.T, a conv patch
embedding is a per-patch dot product), and the LeRobot fixture's parity (test_lerobot_checkpoint)
checks the whole table against LeRobot's own model.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors import safe_open

from configs import get_model_config
from policy import torch_names
from policy.model.params import flatten, init_params

LEROBOT = Path(__file__).resolve().parents[1] / "fixtures" / "lerobot_pi05_tiny" / "checkpoint"


@pytest.mark.parametrize("config", ["pi05_tiny", "pi05_demo"])  # 8 heads of 16, and 2 heads of 32
def test_openpi_tree_to_torch_and_back_is_the_identity(config):
    cfg = get_model_config(config)
    params = jax.tree.map(np.asarray, init_params(cfg, seed=3))
    tensors = torch_names.to_torch(params, cfg)
    assert {k: v.shape for k, v in tensors.items()} == torch_names.torch_shapes(cfg)
    back = torch_names.to_params(tensors.__getitem__, cfg, np.float32)
    for (path, a), (path_b, b) in zip(flatten(params), flatten(back), strict=True):
        assert path == path_b
        np.testing.assert_array_equal(a, b, err_msg=path)


def test_lerobot_tensors_to_openpi_and_back_are_the_saved_ones():
    with safe_open(str(LEROBOT / "model.safetensors"), framework="numpy") as f:
        saved = {k.removeprefix("model."): f.get_tensor(k) for k in f.keys()}
    cfg = get_model_config("pi05_tiny")
    params = torch_names.to_params(saved.__getitem__, cfg, np.float32)
    again = torch_names.to_torch(params, cfg)
    assert set(saved) - set(again) == {torch_names.UNUSED}
    for name, value in again.items():
        np.testing.assert_array_equal(value, saved[name].astype(np.float32), err_msg=name)


def test_full_size_names_and_shapes_are_lerobots():
    """A few of lerobot/pi05_base's tensors, by name and shape (PyTorch's (out, in) Linears)."""
    shapes = torch_names.torch_shapes(get_model_config("pi05"))
    vlm = "paligemma_with_expert.paligemma.model.language_model.layers.17"
    expert = "paligemma_with_expert.gemma_expert.model.layers.0"
    vision = "paligemma_with_expert.paligemma.model.vision_tower.vision_model"
    assert shapes[f"{vlm}.self_attn.q_proj.weight"] == (2048, 2048)
    assert shapes[f"{vlm}.self_attn.k_proj.weight"] == (256, 2048)
    assert shapes[f"{vlm}.mlp.gate_proj.weight"] == (16384, 2048)
    assert shapes[f"{expert}.self_attn.o_proj.weight"] == (1024, 2048)
    assert shapes[f"{expert}.input_layernorm.dense.weight"] == (3072, 1024)
    assert shapes["paligemma_with_expert.gemma_expert.model.norm.dense.bias"] == (3072,)
    assert shapes[f"{vision}.embeddings.patch_embedding.weight"] == (1152, 3, 14, 14)
    assert shapes[f"{vision}.embeddings.position_embedding.weight"] == (256, 1152)
    assert shapes[f"{vision}.encoder.layers.26.self_attn.out_proj.weight"] == (1152, 1152)
    assert shapes["paligemma_with_expert.paligemma.model.multi_modal_projector.linear.weight"] == (2048, 1152)
    assert shapes[torch_names.TIED_EMBEDDING] == (257_152, 2048)
    assert shapes["action_in_proj.weight"] == (1024, 32)
    assert len(shapes) == 811


def _rule(cfg, path: str) -> torch_names.Rule:
    return next(r for r in torch_names.rules(cfg) if r.path == path)


def test_attention_projections_compute_what_pytorch_computes():
    """q: x @ Wq.T split into heads equals openpi's einsum `BD,NDH->BNH`; o: the heads' outputs
    flattened @ Wo.T equals `BNH,NHD->BD`; K and V come apart from openpi's fused kv_einsum."""
    cfg = get_model_config("pi05_demo")
    g, rng = cfg.vlm, np.random.default_rng(0)
    x = rng.normal(size=(5, g.width))
    wq = rng.normal(size=(g.num_heads * g.head_dim, g.width))
    q = _rule(cfg, "PaliGemma/llm/layers/attn/q_einsum/w").to_jax((wq,))
    np.testing.assert_allclose(
        np.einsum("bd,ndh->bnh", x, q), (x @ wq.T).reshape(5, g.num_heads, g.head_dim), atol=1e-9
    )
    heads = rng.normal(size=(5, g.num_heads, g.head_dim))
    wo = rng.normal(size=(g.width, g.num_heads * g.head_dim))
    o = _rule(cfg, "PaliGemma/llm/layers/attn/attn_vec_einsum/w").to_jax((wo,))
    np.testing.assert_allclose(np.einsum("bnh,nhd->bd", heads, o), heads.reshape(5, -1) @ wo.T, atol=1e-9)
    wk, wv = (rng.normal(size=(g.num_kv_heads * g.head_dim, g.width)) for _ in range(2))
    kv = _rule(cfg, "PaliGemma/llm/layers/attn/kv_einsum/w").to_jax((wk, wv))
    np.testing.assert_allclose(np.einsum("bd,kdh->bkh", x, kv[1])[:, 0], x @ wv.T, atol=1e-9)


def test_siglip_rules_compute_what_pytorch_computes():
    cfg = get_model_config("pi05_tiny")
    s, rng = cfg.siglip, np.random.default_rng(1)
    w = rng.normal(size=(s.width, 3, s.patch_size, s.patch_size))  # conv (out, in, h, w)
    patch = rng.normal(size=(s.patch_size, s.patch_size, 3))  # HWC, as openpi's images
    kernel = _rule(cfg, "PaliGemma/img/embedding/kernel").to_jax((w,))
    np.testing.assert_allclose(np.einsum("hwc,hwco->o", patch, kernel), np.einsum("hwc,ochw->o", patch, w), atol=1e-9)
    x = rng.normal(size=(4, s.width))
    wq = rng.normal(size=(s.width, s.width))
    block = "PaliGemma/img/Transformer/encoderblock/MultiHeadDotProductAttention_0"
    q = _rule(cfg, f"{block}/query/kernel").to_jax((wq,))
    np.testing.assert_allclose(np.einsum("bd,dnh->bnh", x, q).reshape(4, -1), x @ wq.T, atol=1e-9)
