"""The engine's files checked in the order that fails fastest, before any weight is fetched.

A full-size checkpoint cannot be written here, and need not be: what is checked before the weights
is orbax's `params/_METADATA` (written below in orbax's JSON format from the config's own tree) and
the `assets/` listing, on fsspec's in-memory filesystem, with every opened path counted. A weights
file beside it is there to show it is never opened. Unreachable remotes are closed local ports.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid

import pytest
from fsspec.implementations.memory import MemoryFileSystem

from configs import SHIPPED_CHECKPOINTS, SHIPPED_TOKENIZERS, get_model_config
from policy import checkpoint, download, tokenizer
from policy.engine.model_files import fetch_model_files
from policy.engine.settings import EngineSettings
from policy.model.params import flatten, param_shapes

STATS = {"norm_stats": {"state": {k: [0.0] * 8 for k in ("mean", "std", "q01", "q99")}}}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _orbax_metadata(config: str, *, write_shape: bool) -> tuple[bytes, bytes]:
    """`params/_METADATA` and `params/array_metadatas/process_0` as orbax writes them for the
    config's tree; older orbax versions record no `write_shape` in the first."""
    tree, arrays = {}, []
    for path, shape in flatten(param_shapes(get_model_config(config))):
        keys = ["params", *path.split("/")]
        value = {"value_type": "jax.Array", "skip_deserialize": False}
        if write_shape:
            value["write_shape"] = list(shape)
        tree[str(tuple(keys))] = {"key_metadata": [{"key": k, "key_type": 2} for k in keys], "value_metadata": value}
        arrays.append({"array_metadata": {"param_name": ".".join(keys), "write_shape": list(shape), "chunk_shape": []}})
    return json.dumps({"tree_metadata": tree}).encode(), json.dumps({"array_metadatas": arrays}).encode()


@pytest.fixture
def full_size(request, monkeypatch):
    """`memory://<bucket>/pi05_droid`: a full-size pi05 checkpoint's metadata, a weights file, norm
    stats for `droid`; the paths opened, in order."""
    fs = MemoryFileSystem()
    root = f"/pi05-test-{uuid.uuid4().hex[:8]}/pi05_droid"
    metadata, arrays = _orbax_metadata("pi05_droid", write_shape=getattr(request, "param", True))
    fs.pipe_file(f"{root}/params/_METADATA", metadata)
    fs.pipe_file(f"{root}/params/array_metadatas/process_0", arrays)
    fs.pipe_file(f"{root}/params/d/weights", b"\0" * 1024)
    fs.pipe_file(f"{root}/assets/droid/norm_stats.json", json.dumps(STATS).encode())
    opened: list[str] = []
    for method in ("_open", "cat_file"):  # a download opens, a metadata read cats
        original = getattr(MemoryFileSystem, method)

        def counting(self, path, *args, original=original, **kwargs):
            opened.append(path.removeprefix(root + "/"))
            return original(self, path, *args, **kwargs)

        monkeypatch.setattr(MemoryFileSystem, method, counting)
    yield f"memory:/{root}", opened
    fs.rm(root.rsplit("/", 1)[0], recursive=True)


def _settings(config: str, checkpoint_dir, **kwargs) -> EngineSettings:
    return EngineSettings(config, checkpoint_dir=checkpoint_dir, **kwargs)


def test_a_missing_local_checkpoint_is_reported_before_the_tokenizer_is_fetched(cache, tmp_path, monkeypatch):
    """Before: `--config pi05_droid --checkpoint /does/not/exist` fetched PaliGemma's tokenizer first
    (35 s offline) and reported that failure, never the missing path."""
    monkeypatch.setattr(tokenizer, "PALIGEMMA_TOKENIZER_URL", f"http://127.0.0.1:{_closed_port()}/tok.model")
    with pytest.raises(checkpoint.CheckpointError, match=f"^checkpoint not found: {tmp_path / 'nope'} does not exist$"):
        fetch_model_files(get_model_config("pi05_droid"), _settings("pi05_droid", tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match=r"^norm stats not found: /no/stats\.json does not exist$"):
        fetch_model_files(get_model_config("pi05_demo"), _settings("pi05_demo", None, norm_stats="/no/stats.json"))
    assert not cache.exists()


@pytest.mark.parametrize("config", ["pi05_tiny", "pi05_droid"])
def test_a_local_checkpoint_of_another_config_is_refused_naming_it(cache, config):
    with pytest.raises(checkpoint.CheckpointError) as refused:
        fetch_model_files(get_model_config(config), _settings(config, SHIPPED_CHECKPOINTS["pi05_demo"]))
    message = str(refused.value)
    assert f"config {config!r} expects" in message and "\n" not in message
    assert message.endswith("it is a checkpoint of config 'pi05_demo': pass --config pi05_demo")


@pytest.mark.parametrize("full_size", [True, False], ids=["write_shape", "older orbax"], indirect=True)
def test_a_remote_checkpoint_of_another_config_is_refused_from_its_metadata(cache, full_size):
    """Before: `--checkpoint gs://openpi-assets/checkpoints/pi05_droid` without `--config` would
    download the whole checkpoint, then fail the shape check against the default config."""
    url, opened = full_size
    with pytest.raises(checkpoint.CheckpointError) as refused:
        fetch_model_files(get_model_config("pi05_demo"), _settings("pi05_demo", url))
    message = str(refused.value)
    assert message.startswith(f"{url}: ") and "config 'pi05_demo' expects" in message
    assert message.endswith("it is a checkpoint of config 'pi05_droid': pass --config pi05_droid")
    assert "params/d/weights" not in opened and opened[0] == "params/_METADATA"
    assert not cache.exists()


def test_a_remote_checkpoint_without_the_configs_norm_stats_is_refused_before_its_weights(cache, full_size):
    url, opened = full_size
    with pytest.raises(checkpoint.CheckpointError) as refused:
        fetch_model_files(get_model_config("pi05_aloha"), _settings("pi05_aloha", url))
    assert str(refused.value) == (
        f"{url} holds no norm stats for config 'pi05_aloha' (asset id 'trossen'; its assets/ holds ['droid']); "
        "it is a checkpoint of config 'pi05_droid': pass --config pi05_droid, or pass the robot's "
        "norm_stats.json (--norm-stats)"
    )
    assert opened == ["params/_METADATA"] and not cache.exists()


def test_a_fitting_remote_checkpoint_is_fetched_after_the_tokenizer(cache, full_size):
    url, opened = full_size
    tok = SHIPPED_TOKENIZERS["tiny"]
    files = fetch_model_files(get_model_config("pi05_droid"), _settings("pi05_droid", url, tokenizer_path=tok))
    assert files.checkpoint == download.cache_path(url) and files.tokenizer == tok and files.norm_stats is None
    assert opened[0] == "params/_METADATA" and "params/d/weights" in opened
    assert (files.checkpoint / "assets" / "droid" / "norm_stats.json").is_file()


def test_an_unreachable_checkpoint_stops_the_server_at_once_in_one_line(tmp_path):
    """Offline, `--checkpoint gs://...` took 35 s and printed a 57-line traceback."""
    url = f"http://127.0.0.1:{_closed_port()}/ckpt"
    result = subprocess.run(
        [sys.executable, "-m", "runtime.policy_server", "--config", "pi05_tiny", "--checkpoint", url,
         "--router-port", "0", "--pub-port", "0", "--ws-port", "0", "--openpi-port", "0"],
        capture_output=True, text=True, timeout=240, env={**os.environ, "PI05_CACHE_DIR": str(tmp_path)},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert errors[0].endswith(
        f"cannot reach {url} (127.0.0.1:{url.split(':')[2].split('/')[0]}: [Errno 111] Connection refused); "
        f"copy {url} by hand to DIR/ckpt and pass DIR/ckpt as --checkpoint"
    )
