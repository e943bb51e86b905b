"""Remote checkpoints, norm stats and tokenizers through fsspec, offline.

The "remote" is fsspec's in-memory filesystem holding a tree in openpi's published layout
(`params/` of the tiny parity fixture, `assets/<asset id>/norm_stats.json`); reads are counted and
made to fail by patching its `_open`. No test reaches the network.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import socket
import uuid
from pathlib import Path

import gcsfs.retry
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from configs import SHIPPED_TOKENIZERS, get_model_config
from policy import checkpoint, download, tokenizer
from policy.engine.inference import AsyncPi05Inference
from policy.engine.settings import EngineSettings
from policy.model.params import flatten
from policy.normalize import checkpoint_normalizer, load_norm_stats
from policy.request import InferenceRequest, Observation, Options

CAMERAS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")


def _stats(offset: float, dim: int = 8) -> dict:
    q01 = np.arange(dim) - 4.0 + offset
    entry = {"mean": [offset] * dim, "std": [1.0] * dim, "q01": q01.tolist(), "q99": (q01 + 2 + offset).tolist()}
    return {"norm_stats": {"state": entry, "actions": entry}}


@pytest.fixture
def remote(fixture_dir):
    """`memory://<bucket>/checkpoints/pi05_droid` in openpi's layout, with stats for two robots."""
    fs = MemoryFileSystem()
    bucket = f"pi05-test-{uuid.uuid4().hex[:8]}"
    root = f"/{bucket}/checkpoints/pi05_droid"
    for path in sorted((fixture_dir / "params").rglob("*")):
        if path.is_file():
            fs.pipe_file(f"{root}/params/{path.relative_to(fixture_dir / 'params').as_posix()}", path.read_bytes())
    fs.pipe_file(f"{root}/assets/droid/norm_stats.json", json.dumps(_stats(1.0)).encode())
    fs.pipe_file(f"{root}/assets/trossen/norm_stats.json", json.dumps(_stats(5.0)).encode())
    fs.pipe_file(f"/{bucket}/paligemma_tokenizer.model", SHIPPED_TOKENIZERS["tiny"].read_bytes())
    yield f"memory://{bucket}/checkpoints/pi05_droid"
    fs.rm(f"/{bucket}", recursive=True)


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """Every path the remote filesystem opens, in order."""
    paths: list[str] = []
    original = MemoryFileSystem._open

    def counting(self, path, *args, **kwargs):
        paths.append(path)
        return original(self, path, *args, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "_open", counting)
    return paths


def _remote_files(url: str) -> dict[str, bytes]:
    fs = MemoryFileSystem()
    root = url.removeprefix("memory:/")
    return {p.removeprefix(root + "/"): fs.cat_file(p) for p in fs.find(root)}


def _local_files(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def test_first_resolve_downloads_the_checkpoint_into_the_cache(cache, remote, caplog):
    out = io.StringIO()  # not a terminal: the progress goes to the log
    with caplog.at_level(logging.INFO, logger="policy.download"):
        local = download.maybe_download(remote, progress=out)
    assert local == cache / "memory" / remote.removeprefix("memory://")
    files = _remote_files(remote)
    assert len(files) > 10 and "params/_METADATA" in files and "assets/droid/norm_stats.json" in files
    assert _local_files(local) == files  # every file, byte for byte, nothing else
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("downloading ")]
    assert progress[-1].startswith(f"downloading {remote}: ") and "(100%," in progress[-1]
    assert out.getvalue() == ""
    assert [p.name for p in local.parent.iterdir() if p.name.endswith(".partial")] == []


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_and_a_log_line_every_few_seconds_elsewhere(caplog):
    now = [0.0]
    tty = _Terminal()
    bar = download.Progress("gs://b/ckpt", 100 << 20, tty, clock=lambda: now[0])
    for _ in range(10):  # 10 MB every 0.125 s: a redraw at most every 0.2 s, so every other one
        now[0] += 0.125
        bar.add(10 << 20)
    bar.close()
    frames = tty.getvalue().split("\r")[1:]
    assert len(frames) == 6 and frames[-1].endswith("(100%, 83.9 MB/s)\n"), frames  # 5 redraws, the last
    assert "\n" not in "".join(frames[:-1])  # redrawn in place

    now[0] = 0.0
    with caplog.at_level(logging.INFO, logger="policy.download"):
        bar = download.Progress("gs://b/ckpt", 80 << 20, io.StringIO(), clock=lambda: now[0])
        for _ in range(80):  # 1 MB every 0.125 s, 10 s in all: a line at 5 s and 10 s, and the end's
            now[0] += 0.125
            bar.add(1 << 20)
        bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split("(")[1].split(",")[0] for line in lines] == ["50%", "100%", "100%"], lines
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="policy.download"):
        quiet = download.Progress("gs://b/ckpt", 10, None, clock=lambda: now[0])
        now[0] += 60
        quiet.add(10)
        quiet.close()
    assert caplog.records == []


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed when the block ends: nothing listens there


def test_an_unreachable_gs_url_fails_at_once_in_one_line_without_gcsfs_retries(cache, monkeypatch):
    """Offline, gcsfs retried six times with backoff (35 s) and logged each traceback. The endpoint
    (here an emulator's, on a closed local port) is probed once; gcsfs never sleeps for a retry."""
    port = _closed_port()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    slept: list[float] = []

    async def no_sleep(delay, *args, **kwargs):
        slept.append(delay)

    monkeypatch.setattr(gcsfs.retry.asyncio, "sleep", no_sleep)
    url = "gs://openpi-assets/checkpoints/pi05_droid"
    with pytest.raises(download.DownloadError) as refused:
        download.maybe_download(url, progress=None)
    message = str(refused.value)
    assert message.startswith(f"cannot reach {url} (127.0.0.1:{port}: ") and "\n" not in message
    assert message.endswith(f"`gsutil -m cp -r {url} DIR` and pass DIR/pi05_droid as the local copy")
    assert slept == []
    assert not download.cache_path(url).exists()


def test_an_unreachable_http_url_fails_in_one_line_naming_it(cache):
    url = f"http://127.0.0.1:{_closed_port()}/ckpt"
    with pytest.raises(download.DownloadError, match=re.escape(f"cannot reach {url} (127.0.0.1:")) as refused:
        download.maybe_download(url, progress=None, pass_as="--checkpoint")
    assert str(refused.value).endswith(
        "copy it by hand to DIR/ckpt and pass DIR/ckpt as --checkpoint".replace("it", url, 1)
    )


def test_second_resolve_reads_nothing(cache, remote, opened):
    first = download.maybe_download(remote, progress=None)
    assert len(opened) == len(_remote_files(remote))
    opened.clear()
    assert download.maybe_download(remote, progress=None) == first
    assert download.maybe_download(remote + "/", progress=None) == first
    assert opened == []


@pytest.mark.parametrize("failure", ["raises", "ends early"])
def test_interrupted_download_leaves_no_complete_entry_and_a_retry_completes(cache, remote, monkeypatch, failure):
    files = _remote_files(remote)
    victim = max(files, key=lambda p: len(files[p]))  # the largest weights file
    original = MemoryFileSystem._open

    class Broken(io.BytesIO):
        def read(self, n=-1):
            if self.tell() >= len(files[victim]) // 2:
                if failure == "raises":
                    raise ConnectionError("connection reset")
                return b""
            return super().read(min(n, len(files[victim]) // 2 - self.tell()) if n > 0 else n)

    def breaking(self, path, *args, **kwargs):
        if path.endswith(victim):
            return Broken(files[victim])
        return original(self, path, *args, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "_open", breaking)
    message = "connection reset" if failure == "raises" else "bytes arrived"
    with pytest.raises(download.DownloadError, match=f"cannot fetch {remote}: .*{message}"):
        download.maybe_download(remote, progress=None)
    local = download.cache_path(remote)
    assert not local.exists()
    assert not local.with_name(local.name + ".partial").exists()

    monkeypatch.setattr(MemoryFileSystem, "_open", original)
    assert _local_files(download.maybe_download(remote, progress=None)) == files


def test_a_partial_left_by_a_killed_process_is_replaced(cache, remote):
    local = download.cache_path(remote)
    stale = local.with_name(local.name + ".partial")
    (stale / "params").mkdir(parents=True)
    (stale / "params" / "_METADATA").write_bytes(b"half")
    assert _local_files(download.maybe_download(remote, progress=None)) == _remote_files(remote)
    assert not stale.exists()


@pytest.mark.parametrize(
    "name",
    [
        "{up}{outside}/escaped.bin",  # climbs out to an absolute place
        "/{outside}/escaped.bin",  # an empty part: the rest is an absolute path
        "params/../../escaped.bin",  # next to the cache entry
        "./params/escaped.bin",
    ],
)
def test_a_remote_name_that_leaves_the_folder_is_refused_and_nothing_is_written(cache, remote, tmp_path, name):
    """A listing is the remote's word: before the fix `params/../../x` was written where it points
    (an adversary's test file landed in /tmp). Every name is checked before anything is written."""
    outside = tmp_path / "outside"
    outside.mkdir()
    name = name.format(up="../" * (len(cache.parts) + 8), outside=str(outside).lstrip("/"))
    fs = MemoryFileSystem()
    bad = remote.removeprefix("memory:/") + "/" + name
    fs.pipe_file(bad, b"planted")
    with pytest.raises(download.DownloadError, match=re.escape(repr(bad))):
        download.maybe_download(remote, progress=None)
    assert not any(outside.iterdir())
    local = download.cache_path(remote)
    written = [p.relative_to(cache).as_posix() for p in cache.rglob("*") if p.is_file()]
    assert written == [local.relative_to(cache).as_posix() + ".lock"], written  # no file, not even the good ones
    fs.rm_file(bad)
    assert _local_files(download.maybe_download(remote, progress=None)) == _remote_files(remote)


def test_a_remote_name_is_quoted_in_the_error_so_it_cannot_forge_log_lines(cache, remote):
    """The startup error is logged as one line: a listed name with a newline or an escape code must
    not start a line of its own there."""
    fs = MemoryFileSystem()
    bad = remote.removeprefix("memory:/") + "/../x\n2026-01-01 00:00:00 INFO forged\x1b[2J"
    fs.pipe_file(bad, b"planted")
    with pytest.raises(download.DownloadError) as refused:
        download.maybe_download(remote, progress=None)
    message = str(refused.value)
    assert repr(bad) in message and "\n" not in message and "\x1b" not in message


def test_a_missing_remote_is_not_found(cache, remote):
    with pytest.raises(FileNotFoundError):
        download.maybe_download(remote + "-missing", progress=None)
    assert not download.cache_path(remote + "-missing").exists()


def test_local_paths_pass_through(tmp_path, opened):
    assert download.maybe_download(tmp_path / "ckpt") == tmp_path / "ckpt"
    assert download.maybe_download("~/ckpt") == Path("~/ckpt").expanduser()
    assert not download.is_url("/data/gs:/x") and download.is_url("gs://openpi-assets/checkpoints/pi05_droid")
    assert opened == []


def test_cache_layout_and_gs_is_anonymous(cache):
    assert download.cache_path("gs://openpi-assets/checkpoints/pi05_droid/") == (
        cache / "gs" / "openpi-assets" / "checkpoints" / "pi05_droid"
    )
    with pytest.raises(ValueError, match="does not name"):
        download.cache_path("gs://bucket/../x")
    fs, root = download._filesystem("gs://big_vision/paligemma_tokenizer.model")
    assert (fs.protocol[0], root, fs.credentials.method) == ("gs", "big_vision/paligemma_tokenizer.model", "anon")


def test_openpis_cache_is_used_for_gs(cache, tmp_path):
    openpi = tmp_path / "openpi" / "openpi-assets" / "checkpoints" / "pi05_droid"
    (openpi / "params").mkdir(parents=True)
    assert download.maybe_download("gs://openpi-assets/checkpoints/pi05_droid") == openpi


def test_norm_stats_are_found_by_asset_id(cache, remote):
    assets = checkpoint.assets_dir(download.maybe_download(remote, progress=None))
    droid = checkpoint_normalizer(get_model_config("pi05_droid"), assets)
    aloha = checkpoint_normalizer(get_model_config("pi05_aloha"), assets)
    np.testing.assert_array_equal(droid.actions.q01, _stats(1.0)["norm_stats"]["actions"]["q01"])
    np.testing.assert_array_equal(aloha.actions.q01, _stats(5.0)["norm_stats"]["actions"]["q01"])
    with pytest.raises(FileNotFoundError, match=r"'physical-intelligence/libero'.*\['droid', 'trossen'\]"):
        checkpoint_normalizer(get_model_config("pi05_libero"), assets)
    # A URL to one robot's folder works as --norm-stats does.
    by_url = load_norm_stats(remote + "/assets/trossen")
    np.testing.assert_array_equal(by_url.state.q99, aloha.state.q99)


def test_paligemma_tokenizer_is_fetched_when_not_given(cache, remote, monkeypatch):
    url = remote.split("/checkpoints/")[0] + "/paligemma_tokenizer.model"
    monkeypatch.setattr(tokenizer, "PALIGEMMA_TOKENIZER_URL", url)
    cfg = get_model_config("pi05")
    with pytest.raises(FileNotFoundError, match="is not shipped"):
        tokenizer.load_tokenizer(cfg)  # a library call without fetch never reaches the network
    tok = tokenizer.load_tokenizer(cfg, fetch=True)
    assert tok.path == download.cache_path(url)
    assert tok.path.read_bytes() == SHIPPED_TOKENIZERS["tiny"].read_bytes()
    assert tok.encode("pick up the pen") == tokenizer.load_tokenizer(get_model_config("pi05_tiny")).encode(
        "pick up the pen"
    )


def _request() -> InferenceRequest:
    rng = np.random.default_rng(0)
    images = {k: rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for k in CAMERAS}
    state = np.linspace(-1, 1, 8, dtype=np.float32)
    return InferenceRequest(Observation(images, state), "pick up the pen", Options(generate_subtask=False, seed=0))


def _serve(checkpoint_dir, norm_stats) -> tuple[np.ndarray, AsyncPi05Inference]:
    engine = AsyncPi05Inference(
        EngineSettings(
            "pi05_tiny",
            checkpoint_dir=checkpoint_dir,
            norm_stats=norm_stats,
            max_batch=1,
            max_decoding_steps_limit=4,
            image_resolutions=(),
            compile_in_background=False,
        )
    )

    async def go():
        async with engine:
            return (await engine.submit(_request())).actions

    return asyncio.run(go()), engine


def test_engine_serves_the_remote_checkpoint_like_the_local_one(
    cache, remote, opened, fixture_dir, tmp_path, jax_cache, tiny_params
):
    AsyncPi05Inference(EngineSettings("pi05_tiny", checkpoint_dir=remote, norm_stats=remote + "/assets/droid"))
    assert opened == [] and not cache.exists()  # constructing reads nothing

    remote_actions, engine = _serve(remote, remote + "/assets/droid")
    assert engine.info()["checkpoint"] == remote
    assert any(p.endswith("params/_METADATA") for p in opened)
    # The weights served are the checkpoint's (random weights would give other actions on both sides).
    for (path, got), (_, want) in zip(flatten(engine._executables.params), flatten(tiny_params), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=path)

    (tmp_path / "norm_stats.json").write_text(json.dumps(_stats(1.0)))
    local_actions, _ = _serve(fixture_dir, tmp_path / "norm_stats.json")
    assert remote_actions.shape == (50, 8)
    np.testing.assert_array_equal(remote_actions, local_actions)
