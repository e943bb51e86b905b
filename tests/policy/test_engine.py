"""`AsyncPi05Inference` on the tiny model: batching, the two stages, timings and input errors."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import numpy as np
import pytest

from policy.engine import AsyncPi05Inference

CAMERAS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")


def _images(seed: int, cameras=CAMERAS, shape=(224, 224, 3)) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.integers(0, 256, shape, dtype=np.uint8) for k in cameras}


def run(coro):
    return asyncio.run(coro)


def test_infer_returns_every_field(engine):
    out = run(engine.infer(_images(0), "pick up the pen", state=[0.1, -0.2], max_decoding_steps=6, seed=3))
    assert out["actions"].shape == (50, 32) and out["actions"].dtype == np.float32
    assert np.isfinite(out["actions"]).all()
    assert isinstance(out["subtask"], str)
    assert 1 <= len(out["subtask_tokens"]) <= 6
    assert all(isinstance(t, int) for t in out["subtask_tokens"])
    assert engine.tokenizer.decode(out["subtask_tokens"]).strip() == out["subtask"]
    np.testing.assert_array_equal(out["state"], np.float32([0.1, -0.2]))
    t = out["timing"]
    assert t["subtask_ms"] > 0 and t["action_ms"] > 0
    assert t["total_ms"] >= t["subtask_ms"] + t["action_ms"]


def test_concurrent_calls_are_batched_and_match_alone(engine):
    kwargs = [dict(images=_images(i), high_level_prompt=f"task {i}", state=[i / 10], seed=100 + i) for i in range(4)]
    alone = [run(engine.infer(**kw, max_decoding_steps=8, temperature=0.7)) for kw in kwargs]
    before = engine.batch_counts[("action", 4)]

    async def together():
        return await asyncio.gather(*(engine.infer(**kw, max_decoding_steps=8, temperature=0.7) for kw in kwargs))

    batched = run(together())
    assert engine.batch_counts[("action", 4)] == before + 1  # the four went through as one batch
    for a, b in zip(alone, batched, strict=True):
        assert a["subtask_tokens"] == b["subtask_tokens"]
        np.testing.assert_allclose(a["actions"], b["actions"], atol=1e-5)
    # Different seeds and inputs give different chunks.
    assert np.abs(batched[0]["actions"] - batched[1]["actions"]).max() > 1e-3


def test_same_seed_same_result_and_fresh_seeds_differ(engine):
    a = run(engine.infer(_images(1), "wipe the table", seed=5, max_decoding_steps=4))
    b = run(engine.infer(_images(1), "wipe the table", seed=5, max_decoding_steps=4))
    c = run(engine.infer(_images(1), "wipe the table", max_decoding_steps=4))
    np.testing.assert_array_equal(a["actions"], b["actions"])
    assert np.abs(a["actions"] - c["actions"]).max() > 1e-3


def test_low_level_prompt_skips_decoding_and_conditions_actions(engine):
    images = _images(2)
    generated = run(engine.infer(images, "fold the towel", seed=9, max_decoding_steps=5, temperature=0))
    given = run(
        engine.infer(images, "fold the towel", low_level_prompt=generated["subtask"], generate_subtask=False, seed=9),
    )
    assert given["timing"]["subtask_ms"] == 0.0
    assert given["subtask"] == generated["subtask"]
    # The same subtask text in the action prompt gives the same chunk, decoded or given.
    np.testing.assert_array_equal(given["actions"], generated["actions"])
    other = run(
        engine.infer(images, "fold the towel", low_level_prompt="open the drawer", generate_subtask=False, seed=9),
    )
    assert np.abs(other["actions"] - given["actions"]).max() > 1e-4


def test_generate_subtask_alone(engine):
    full = run(engine.infer(_images(3), "stack the cups", seed=4, max_decoding_steps=7))
    only = run(engine.generate_subtask(_images(3), "stack the cups", seed=4, max_decoding_steps=7))
    assert only["subtask_tokens"] == full["subtask_tokens"]
    assert set(only) == {"subtask", "subtask_tokens", "timing"}
    assert only["timing"]["subtask_ms"] > 0


def test_missing_camera_and_any_image_size(engine):
    images = {"base_0_rgb": _images(4, ("base_0_rgb",), (480, 640, 3))["base_0_rgb"]}
    out = run(engine.infer(images, "go", generate_subtask=False, seed=1))
    assert out["actions"].shape == (50, 32)
    # A masked camera is not invented: changing what would be its pixels changes nothing.
    out2 = run(engine.infer(images, "go", generate_subtask=False, seed=1))
    np.testing.assert_array_equal(out["actions"], out2["actions"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(images={"base_0_rgb": np.zeros((224, 224, 3), np.float32)}), "must be uint8"),
        (dict(images={"base_0_rgb": np.zeros((224, 224), np.uint8)}), r"shape \(H, W, 3\)"),
        (dict(images={"front": np.zeros((224, 224, 3), np.uint8)}), "unknown camera 'front'"),
        (dict(images={}), "non-empty mapping"),
        (dict(high_level_prompt="   "), "high_level_prompt must be a non-empty string"),
        (dict(high_level_prompt="pick " * 300), "more than max_token_len 200"),
        (dict(state=[1.0] * 40), "state has 40 values"),
        (dict(state=[[1.0, 2.0]]), "1-D"),
        (dict(state=[float("nan")]), "NaN"),
        (dict(max_decoding_steps=0), r"max_decoding_steps must be in 1\.\.12"),
        (dict(max_decoding_steps=13), r"max_decoding_steps must be in 1\.\.12"),
        (dict(temperature=-1.0), "temperature must be finite and >= 0"),
        (dict(seed=-4), "seed must be an integer"),
    ],
)
def test_bad_input_raises_before_device_work(engine, change, message):
    before = sum(engine.batch_counts.values())
    kwargs = dict(images=_images(0), high_level_prompt="pick up the pen", max_decoding_steps=4) | change
    with pytest.raises(ValueError, match=message):
        run(engine.infer(**kwargs))
    assert sum(engine.batch_counts.values()) == before


_START_AND_CLOSE = """
import asyncio, sys
from policy.engine import AsyncPi05Inference

async def main():
    engine = AsyncPi05Inference("pi05_tiny", max_batch=1, max_decoding_steps_limit=4, compile_cache_dir=sys.argv[1])
    await engine.start()
    await engine.close()

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


def test_norm_stats_shape_state_and_actions(tmp_path):
    stats = {
        "norm_stats": {
            "state": {"mean": [0] * 8, "std": [1] * 8, "q01": [-2] * 8, "q99": [2] * 8},
            "actions": {"mean": [0] * 8, "std": [1] * 8, "q01": [10] * 8, "q99": [20] * 8},
        }
    }
    (tmp_path / "norm_stats.json").write_text(json.dumps(stats))

    async def go():
        async with AsyncPi05Inference(
            "pi05_tiny", max_batch=1, max_decoding_steps_limit=4, norm_stats=tmp_path, compile_cache_dir=None
        ) as engine:
            with pytest.raises(ValueError, match="state has 7 values, this robot's norm stats expect 8"):
                await engine.infer(_images(0), "go", state=[0.0] * 7)
            return await engine.infer(_images(0), "go", state=[0.0] * 8, generate_subtask=False, seed=0)

    out = asyncio.run(go())
    assert out["actions"].shape == (50, 8)
    # Unnormalized from model space, where the flow from N(0, 1) noise lands around [-1, 1]: so
    # around [10, 20] here, and far from the model-space values.
    assert 5 < float(np.median(out["actions"])) < 25


def test_start_failure_is_reported(tmp_path):
    async def go():
        engine = AsyncPi05Inference("pi05_tiny", checkpoint_dir=tmp_path / "missing", compile_cache_dir=None)
        await engine.start()

    with pytest.raises(ValueError, match="does not exist"):
        asyncio.run(go())
