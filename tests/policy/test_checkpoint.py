"""Checkpoints written and read back with orbax in openpi's layout, and precise errors on misfit."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import get_model_config
from policy.checkpoint import CheckpointError, load_params, parse_metadata, save_params
from policy.model.params import flatten, init_params, param_shapes


@pytest.fixture(scope="module")
def random_params(tiny_cfg):
    return init_params(tiny_cfg, seed=3)


def test_round_trip(tmp_path, tiny_cfg, random_params):
    save_params(tmp_path / "ckpt" / "params", random_params)
    restored = load_params(tmp_path / "ckpt", tiny_cfg, dtype=jnp.float32)
    for (pa, a), (pb, b) in zip(flatten(random_params), flatten(restored), strict=True):
        assert pa == pb
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_restore_in_bfloat16(tmp_path, tiny_cfg, random_params):
    save_params(tmp_path / "params", random_params)
    restored = load_params(tmp_path / "params", tiny_cfg, dtype=jnp.bfloat16)
    leaf = restored["action_in_proj"]["kernel"]
    assert leaf.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(leaf, np.float32), random_params["action_in_proj"]["kernel"], rtol=1e-2)


def test_training_checkpoint_value_suffix_is_stripped(tmp_path, tiny_cfg, random_params):
    wrapped = jax.tree.map(lambda x: {"value": np.asarray(x)}, random_params)
    ocp.PyTreeCheckpointer().save(tmp_path / "params", {"params": wrapped})
    restored = load_params(tmp_path / "params", tiny_cfg, dtype=jnp.float32)
    np.testing.assert_array_equal(restored["time_mlp_out"]["bias"], random_params["time_mlp_out"]["bias"])


def _mutated(params, fn):
    params = jax.tree.map(np.asarray, params)
    fn(params)
    return params


def test_missing_parameter_is_named(tmp_path, tiny_cfg, random_params):
    params = _mutated(random_params, lambda p: p["PaliGemma"]["llm"].pop("final_norm"))
    save_params(tmp_path / "params", params)
    with pytest.raises(CheckpointError, match=r"missing parameter PaliGemma/llm/final_norm/scale .*\(64,\)"):
        load_params(tmp_path, tiny_cfg)


def test_unexpected_parameter_is_named(tmp_path, tiny_cfg, random_params):
    params = _mutated(random_params, lambda p: p.update(state_proj={"kernel": np.zeros((32, 64), np.float32)}))
    save_params(tmp_path / "params", params)
    with pytest.raises(CheckpointError, match=r"unexpected parameter state_proj/kernel with shape \(32, 64\)"):
        load_params(tmp_path, tiny_cfg)


def test_misshaped_parameter_names_both_shapes(tmp_path, random_params):
    save_params(tmp_path / "params", random_params)
    # A config with a wider action chunk than the checkpoint holds.
    cfg = get_model_config("pi05_tiny").replace(action_dim=14)
    with pytest.raises(CheckpointError, match=r"action_in_proj/kernel has shape \(32, 64\) .* expects \(14, 64\)"):
        load_params(tmp_path, cfg)


def test_missing_directory(tmp_path, tiny_cfg):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_params(tmp_path / "nope", tiny_cfg)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="is not an openpi checkpoint"):
        load_params(tmp_path / "empty", tiny_cfg)


def test_full_config_rejects_tiny_checkpoint_before_reading_weights(fixture_dir):
    with pytest.raises(CheckpointError, match=r"PaliGemma/img/.*has shape .* expects"):
        load_params(fixture_dir, get_model_config("pi05"))


def test_the_metadata_json_gives_the_tree_orbax_reads(fixture_dir, tiny_cfg):
    """A remote checkpoint is checked from `params/_METADATA` alone: its JSON must give exactly the
    shapes orbax reads, and, without `write_shape` (older orbax), those of `array_metadatas/`."""
    params = fixture_dir / "params"
    expected = dict(flatten(param_shapes(tiny_cfg)))
    assert parse_metadata((params / "_METADATA").read_bytes()) == expected
    stripped = json.loads((params / "_METADATA").read_bytes())
    for leaf in stripped["tree_metadata"].values():
        del leaf["value_metadata"]["write_shape"]
    stripped = json.dumps(stripped).encode()
    assert parse_metadata(stripped) == dict.fromkeys(expected)  # the paths, shapes unknown
    assert parse_metadata(stripped, (params / "array_metadatas" / "process_0").read_bytes()) == expected
    with pytest.raises(CheckpointError, match="is not orbax's metadata"):
        parse_metadata(b"<html>not found</html>")
