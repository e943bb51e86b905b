"""A PyTorch-layout checkpoint is a fetched file a stranger may have written: random, mutated and
oversized config.json, processor files and safetensors (headers included) are each either read as a
valid checkpoint or refused with a `CheckpointError` of one line; nothing else escapes, and nothing is
allocated by what a file claims."""

from __future__ import annotations

import json
import random
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest

from configs import DEMO_MODEL, get_model_config
from policy import torch_checkpoint, torch_folder
from policy.checkpoint import CheckpointError

CHECKPOINT = Path(__file__).resolve().parents[1] / "fixtures" / "lerobot_pi05_tiny" / "checkpoint"
JSON_FILES = ("config.json", "policy_preprocessor.json", "policy_postprocessor.json")
SAFETENSORS = tuple(sorted(p.name for p in CHECKPOINT.glob("*.safetensors")))
CASES = 300


def _value(rng: random.Random, depth: int = 0) -> Any:
    """A random JSON value: the types config files hold, and hostile sizes and nestings."""
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 1, 7, 2**31, 2**63, -(2**63), 10**30])
    if kind == 3:
        return rng.choice([0.0, -0.5, 1e-300, 1e300, float("inf"), float("nan")])
    if kind == 4:
        return rng.choice(
            ["", "pi05", "VISUAL", "STATE", "ACTION", "gemma_2b", "dummy", "../../etc/passwd", "x" * 5000]
        )
    if kind == 5:
        return rng.choice([[], [3, 224, 224], [6], [-1], [10**9, 10**9]])
    if kind in (6, 7):
        return [_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {
        rng.choice(["type", "shape", "steps", "config", "state_file", "x"]): _value(rng, depth + 1) for _ in range(3)
    }


def _mutate_json(node: Any, rng: random.Random) -> Any:
    """`node` with one random subtree (or key) replaced, dropped or given a hostile value."""
    if isinstance(node, dict) and node and rng.random() < 0.8:
        key = rng.choice(sorted(node))
        action = rng.randrange(3)
        if action == 0:
            return {k: v for k, v in node.items() if k != key}
        if action == 1:
            return {**node, key: _value(rng)}
        return {**node, key: _mutate_json(node[key], rng)}
    if isinstance(node, list) and node and rng.random() < 0.8:
        i = rng.randrange(len(node))
        return [*node[:i], _mutate_json(node[i], rng), *node[i + 1 :]]
    return _value(rng)


def _mutate_safetensors(data: bytes, rng: random.Random) -> bytes:
    """A header length that lies, a garbled or hostile header, flipped bytes, or a cut file."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    kind = rng.randrange(6)
    if kind == 0:
        return struct.pack("<Q", rng.choice([0, 2**63, 2**40, length + 10**6])) + data[8:]
    if kind == 1:
        return data[: rng.randrange(len(data))]
    if kind == 2:
        flipped = bytearray(data)
        for _ in range(rng.randrange(1, 20)):
            flipped[rng.randrange(8, 8 + length)] ^= 1 << rng.randrange(8)
        return bytes(flipped)
    name = rng.choice([n for n in header if n != "__metadata__"])
    entry = dict(header[name])
    if kind == 3:
        entry["shape"] = rng.choice([[10**12, 10**12], [-1], [], [0], _value(rng)])
    elif kind == 4:
        entry["data_offsets"] = rng.choice([[0, 2**62], [5, 1], [-3, 4], _value(rng)])
    else:
        entry["dtype"] = rng.choice(["I64", "BOOL", "F8_E4M3", "Q4", _value(rng)])
    body = json.dumps({**header, name: entry}).encode()
    return struct.pack("<Q", len(body)) + body + data[8 + length :]


def _hostile_copy(tmp: Path, rng: random.Random) -> Path:
    folder = tmp / "checkpoint"
    shutil.copytree(CHECKPOINT, folder)
    target = rng.choice(JSON_FILES + SAFETENSORS)
    path = folder / target
    if target.endswith(".json"):
        text = rng.choice([json.dumps(_mutate_json(json.loads(path.read_text()), rng)), "{", "[]", "\x00" * 64, ""])
        path.write_text(text)
    else:
        path.write_bytes(_mutate_safetensors(path.read_bytes(), rng))
    return folder


@pytest.mark.parametrize("seed", range(CASES))
def test_a_mutated_checkpoint_is_read_or_refused_in_one_line(tmp_path, seed):
    rng = random.Random(seed)
    folder = _hostile_copy(tmp_path, rng)
    try:
        described = torch_folder.describe(folder, get_model_config(DEMO_MODEL), own_norm_stats=False)
    except CheckpointError as e:
        assert "\n" not in str(e) and len(str(e)) < 2000, str(e)
        return
    # Read as valid: the weights it names must then load, or be refused the same way.
    try:
        torch_checkpoint.load_params(folder / torch_checkpoint.WEIGHTS, described.cfg, expects=described.expects)
    except CheckpointError as e:
        assert "\n" not in str(e), str(e)
