"""Remote checkpoints and tokenizers (`gs://openpi-assets/...`, any fsspec URL) in a local cache.

openpi publishes its checkpoints and PaliGemma's tokenizer on public GCS buckets; users name them by
URL, as openpi's `download.maybe_download` does. A URL is fetched once, anonymously for `gs://`,
into `<cache>/<scheme>/<bucket>/<path>` (the cache is `$PI05_CACHE_DIR`, default
`~/.cache/pi05-runtime`) and read from there afterwards, with no network access. A download goes to
`<name>.partial` and is renamed when every byte has arrived, so an interrupted one never looks
complete; a file lock keeps two processes from filling the same entry. A copy already in openpi's own
cache (`$OPENPI_DATA_HOME`, default `~/.cache/openpi`) is used as it is: openpi renames its downloads
into place the same way. Local paths pass through unchanged.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import logging
import os
import re
import shutil
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

log = logging.getLogger(__name__)

CACHE_ENV = "PI05_CACHE_DIR"
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_CHUNK = 8 << 20
# Files fetched at once: a checkpoint is a few dozen files of up to a few GB.
_WORKERS = 8


class DownloadError(RuntimeError):
    """A remote location could not be fetched (network, permissions, a transfer cut short)."""


def is_url(location: str | os.PathLike) -> bool:
    """True for `scheme://...` (fetched through fsspec), False for a local path."""
    return bool(_URL.match(os.fspath(location)))


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/pi05-runtime").expanduser()


def cache_path(url: str) -> Path:
    """Where `url` lives in the cache: `<cache>/<scheme>/<bucket>/<path>`."""
    parts = urllib.parse.urlsplit(url.rstrip("/"))
    relative = [p for p in f"{parts.netloc}/{parts.path}".split("/") if p]
    if not relative or any(p in (".", "..") for p in relative):
        raise ValueError(f"{url!r} does not name a file or folder")
    return cache_dir().joinpath(parts.scheme, *relative)


def maybe_download(location: str | os.PathLike, *, progress: TextIO | None = sys.stderr) -> Path:
    """The local path of `location`: itself when local, else its cache entry, fetched if missing.

    A folder is fetched whole (files in parallel). `progress` gets a progress line (None: quiet).
    Raises FileNotFoundError when the URL names nothing, DownloadError when the fetch fails.
    """
    if not is_url(location):
        return Path(location).expanduser()
    url = os.fspath(location).rstrip("/")
    local = cache_path(url)
    if local.exists():
        return local
    if (openpi := _openpi_copy(url)) is not None:
        log.info("using openpi's cached copy of %s: %s", url, openpi)
        return openpi
    local.parent.mkdir(parents=True, exist_ok=True)
    with _locked(local.with_name(local.name + ".lock")):
        if local.exists():  # another process finished it while this one waited
            return local
        scratch = local.with_name(local.name + ".partial")
        _remove(scratch)  # left by an interrupted download
        try:
            _download(url, scratch, progress)
            scratch.rename(local)
        except BaseException as e:
            _remove(scratch)
            if isinstance(e, Exception) and not isinstance(e, FileNotFoundError | DownloadError):
                raise DownloadError(f"cannot fetch {url}: {type(e).__name__}: {e}") from e
            raise
    log.info("downloaded %s to %s", url, local)
    return local


def _openpi_copy(url: str) -> Path | None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "gs":
        return None
    root = Path(os.environ.get("OPENPI_DATA_HOME") or "~/.cache/openpi").expanduser()
    path = root / parts.netloc / parts.path.strip("/")
    return path if path.exists() else None


def _filesystem(url: str):
    import fsspec

    scheme = urllib.parse.urlsplit(url).scheme
    # openpi's buckets are public: no credentials are looked for, none are needed.
    options = {"token": "anon"} if scheme in ("gs", "gcs") else {}
    return fsspec.core.url_to_fs(url, **options)


def _download(url: str, scratch: Path, progress: TextIO | None) -> None:
    fs, root = _filesystem(url)
    info = fs.info(root)  # FileNotFoundError when the URL names nothing
    if info["type"] == "file":
        files = [(root, scratch, int(info["size"]))]
    else:
        found = fs.find(root, detail=True)
        if not found:
            raise FileNotFoundError(f"{url}: an empty folder")
        prefix = root.rstrip("/") + "/"
        files = [(p, _destination(scratch, prefix, p), int(i["size"])) for p, i in sorted(found.items())]
        scratch.mkdir(parents=True)
    bar = Progress(url, sum(size for *_, size in files), progress)
    stop = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(min(_WORKERS, len(files)), thread_name_prefix="pi05-fetch") as pool:
        jobs = [pool.submit(_copy, fs, src, dst, size, bar, stop) for src, dst, size in files]
        try:
            for job in concurrent.futures.as_completed(jobs):
                job.result()
        finally:
            stop.set()  # on a failure the other files stop at their next chunk
    bar.close()


def _destination(scratch: Path, prefix: str, name: str) -> Path:
    """Where the remote object `name` of a folder listed under `prefix` lands: inside `scratch`, or a
    `DownloadError` naming it. A listing is the remote's word: a name with `..`, an absolute part
    or outside the prefix would otherwise be written wherever it points. Checked for every name
    before anything is written."""
    relative = name.removeprefix(prefix)
    parts = relative.split("/")
    if (
        not name.startswith(prefix)
        or any(part in ("", ".", "..") or "\0" in part for part in parts)
        or not (target := scratch.joinpath(*parts)).resolve().is_relative_to(scratch.resolve())
    ):
        raise DownloadError(
            f"the remote folder {prefix!r} lists {name!r}, not a plain name inside it (a '..', '.', empty or "
            f"absolute part); nothing was written"
        )
    return target


def _copy(fs, src: str, dst: Path, size: int, bar: Progress, stop: threading.Event) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    done = 0
    with fs.open(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(_CHUNK):
            if stop.is_set():
                raise InterruptedError(f"download of {src!r} stopped: another file failed")
            fout.write(chunk)
            done += len(chunk)
            bar.add(len(chunk))
    if done != size:
        raise OSError(f"{src!r}: {done} bytes arrived, {size} expected")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


class Progress:
    """Bytes arrived of a download, on one stream: redrawn in place on a terminal (at most every
    0.2 s), else a line each 10%. Thread-safe: the files of a folder arrive in parallel."""

    def __init__(self, label: str, total: int, stream: TextIO | None, clock=time.monotonic):
        self.label = label
        self.total = total
        self.done = 0
        self._stream = stream
        self._tty = bool(stream is not None and stream.isatty())
        self._clock = clock
        self._start = clock()
        self._shown = -1.0  # the time (terminal) or the tenth (other streams) last shown
        self._lock = threading.Lock()

    def add(self, nbytes: int) -> None:
        with self._lock:
            self.done += nbytes
            if self._stream is None:
                return
            if self._tty:
                now = self._clock()
                if now - self._shown >= 0.2:
                    self._shown = now
                    self._stream.write("\r" + self._line())
                    self._stream.flush()
            elif (tenth := (10 * self.done) // max(self.total, 1)) > self._shown:
                self._shown = tenth
                self._stream.write(self._line() + "\n")
                self._stream.flush()

    def close(self) -> None:
        if self._stream is not None and self._tty:
            self._stream.write("\r" + self._line() + "\n")
            self._stream.flush()

    def _line(self) -> str:
        elapsed = max(self._clock() - self._start, 1e-9)
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return (
            f"downloading {self.label}: {self.done / 1e9:.2f} of {self.total / 1e9:.2f} GB "
            f"({pct:.0f}%, {self.done / elapsed / 1e6:.1f} MB/s)"
        )
