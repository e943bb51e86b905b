"""Remote checkpoints and tokenizers (`gs://openpi-assets/...`, any fsspec URL) in a local cache.

openpi publishes its checkpoints and PaliGemma's tokenizer on public GCS buckets; users name them by
URL, as openpi's `download.maybe_download` does. A URL is fetched once, anonymously for `gs://`,
into `<cache>/<scheme>/<bucket>/<path>` (the cache is `$PI05_CACHE_DIR`, default
`~/.cache/pi05-runtime`) and read from there afterwards, with no network access. A download goes to
`<name>.partial` and is renamed when every byte has arrived, so an interrupted one never looks
complete; a file lock keeps two processes from filling the same entry. A copy already in openpi's own
cache (`$OPENPI_DATA_HOME`, default `~/.cache/openpi`) is used as it is: openpi renames its downloads
into place the same way. Local paths pass through unchanged.

Offline, gcsfs retries a refused request six times with backoff (35 s) and logs each traceback, so
the remote's host is probed first, once, with a connect timeout of `CONNECT_TIMEOUT_S`: an
unreachable URL is one `DownloadError` line within seconds, naming the command that fetches it by
hand. Requests get a connect and a read timeout, so a stalled transfer fails instead of hanging.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import logging
import os
import re
import shutil
import socket
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
# The reachability probe's one try (DNS and TCP connect), and every request's connect timeout.
CONNECT_TIMEOUT_S = 3.0
# No byte for this long on an open transfer: it failed (a GB file arrives in 8 MB reads).
_READ_TIMEOUT_S = 60.0
# A progress line this often at INFO when the stream is not a terminal (a log file, journald).
PROGRESS_LOG_S = 5.0


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


def local_copy(location: str | os.PathLike) -> Path | None:
    """The local path of `location` when it needs no network: a local path (existing or not), or a
    URL already in the cache or openpi's; None for a URL that must be fetched."""
    if not is_url(location):
        return Path(location).expanduser()
    url = os.fspath(location).rstrip("/")
    if (local := cache_path(url)).exists():
        return local
    if (openpi := _openpi_copy(url)) is not None:
        log.info("using openpi's cached copy of %s: %s", url, openpi)
        return openpi
    return None


def maybe_download(
    location: str | os.PathLike, *, progress: TextIO | None = sys.stderr, pass_as: str = "the local copy"
) -> Path:
    """The local path of `location`: itself when local, else its cache entry, fetched if missing.

    A folder is fetched whole (files in parallel). `progress` gets a progress bar when it is a
    terminal, else INFO lines every `PROGRESS_LOG_S` (None: quiet). `pass_as` names the setting the
    by-hand copy goes to in the error (`--checkpoint`). Raises FileNotFoundError when the URL names
    nothing, DownloadError when the fetch fails.
    """
    if (found := local_copy(location)) is not None:
        return found
    url = os.fspath(location).rstrip("/")
    local = cache_path(url)
    local.parent.mkdir(parents=True, exist_ok=True)
    with _locked(local.with_name(local.name + ".lock")):
        if local.exists():  # another process finished it while this one waited
            return local
        scratch = local.with_name(local.name + ".partial")
        _remove(scratch)  # left by an interrupted download
        try:
            _download(url, scratch, progress, pass_as)
            scratch.rename(local)
        except BaseException as e:
            _remove(scratch)
            if isinstance(e, Exception) and not isinstance(e, FileNotFoundError | DownloadError):
                raise DownloadError(f"cannot fetch {url}: {type(e).__name__}: {e}; {_by_hand(url, pass_as)}") from e
            raise
    log.info("downloaded %s to %s", url, local)
    return local


def read_small(url: str, part_of: str, pass_as: str) -> bytes:
    """The bytes of one small remote file of the folder `part_of` (a checkpoint's metadata), read
    without caching it: a cache entry inside a checkpoint's folder would make the whole folder look
    fetched. A failure names `part_of`, the location the user gave."""
    fs, root = _reachable(url, part_of, pass_as)
    try:
        return fs.cat_file(root)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise DownloadError(f"cannot fetch {url}: {type(e).__name__}: {e}; {_by_hand(part_of, pass_as)}") from e


def list_files(url: str, part_of: str, pass_as: str) -> list[str]:
    """The files under a remote folder of `part_of`, as paths relative to it, sorted; [] when
    there is none."""
    fs, root = _reachable(url, part_of, pass_as)
    prefix = root.rstrip("/") + "/"
    try:
        return sorted(p.removeprefix(prefix) for p in fs.find(root) if p.startswith(prefix))
    except FileNotFoundError:
        return []
    except Exception as e:
        raise DownloadError(f"cannot list {url}: {type(e).__name__}: {e}; {_by_hand(part_of, pass_as)}") from e


def _by_hand(url: str, pass_as: str) -> str:
    """How to fetch `url` without this process: the command, and where its result goes."""
    name = url.rstrip("/").rsplit("/", 1)[-1]
    if urllib.parse.urlsplit(url).scheme in ("gs", "gcs"):
        return f"fetch it by hand with `gsutil -m cp -r {url} DIR` and pass DIR/{name} as {pass_as}"
    return f"copy {url} by hand to DIR/{name} and pass DIR/{name} as {pass_as}"


def _openpi_copy(url: str) -> Path | None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "gs":
        return None
    root = Path(os.environ.get("OPENPI_DATA_HOME") or "~/.cache/openpi").expanduser()
    path = root / parts.netloc / parts.path.strip("/")
    return path if path.exists() else None


def _filesystem(url: str):
    import aiohttp
    import fsspec

    scheme = urllib.parse.urlsplit(url).scheme
    timeout = aiohttp.ClientTimeout(sock_connect=CONNECT_TIMEOUT_S, sock_read=_READ_TIMEOUT_S)
    options: dict = {}
    if scheme in ("gs", "gcs"):
        # openpi's buckets are public: no credentials are looked for, none are needed.
        options = {"token": "anon", "requests_timeout": timeout}
    elif scheme in ("http", "https"):
        options = {"client_kwargs": {"timeout": timeout}}
    return fsspec.core.url_to_fs(url, **options)


def _endpoint(fs, url: str) -> tuple[str, int] | None:
    """The host and port a URL's requests go to (gcsfs: its API endpoint, or the emulator's);
    None for a filesystem that is not reached over the network by a known endpoint."""
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme in ("gs", "gcs"):
        url = fs._location
    elif scheme not in ("http", "https"):
        return None
    parts = urllib.parse.urlsplit(url)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


def _reachable(url: str, part_of: str, pass_as: str):
    """The filesystem and path of `url`, once its endpoint took a TCP connection (`probe`), so an
    offline host fails now instead of after gcsfs's retries."""
    fs, root = _filesystem(url)
    if (endpoint := _endpoint(fs, url)) is not None:
        probe(endpoint, part_of, _by_hand(part_of, pass_as))
    return fs, root


def probe(endpoint: tuple[str, int], what: str, by_hand: str) -> None:
    """One try at a TCP connection to `endpoint` within `CONNECT_TIMEOUT_S` (the name lookup
    included, on a daemon thread that may outlive it); unreachable: `DownloadError` naming `what`,
    the endpoint and why, then `by_hand`, how to fetch it without this process."""
    outcome: list[BaseException | None] = []

    def connect() -> None:
        try:
            socket.create_connection(endpoint, timeout=CONNECT_TIMEOUT_S).close()
            outcome.append(None)
        except OSError as e:
            outcome.append(e)

    thread = threading.Thread(target=connect, name="download-probe", daemon=True)
    thread.start()
    thread.join(CONNECT_TIMEOUT_S)
    if not outcome or outcome[0] is not None:
        why = f"{outcome[0]}" if outcome else f"no answer within {CONNECT_TIMEOUT_S:g} s"
        host, port = endpoint
        raise DownloadError(f"cannot reach {what} ({host}:{port}: {why}); {by_hand}")


def _download(url: str, scratch: Path, progress: TextIO | None, pass_as: str) -> None:
    fs, root = _reachable(url, url, pass_as)
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
    """Bytes arrived of a download. On a terminal, a bar redrawn in place (at most every 0.2 s);
    otherwise (a log file, journald) an INFO line every `PROGRESS_LOG_S` and one at the end, so a
    log shows a long download moving without a line per chunk. Thread-safe: the files of a folder
    arrive in parallel. `stream` None: quiet."""

    def __init__(self, label: str, total: int, stream: TextIO | None, clock=time.monotonic):
        self.label = label
        self.total = total
        self.done = 0
        self._stream = stream
        self._tty = bool(stream is not None and stream.isatty())
        self._clock = clock
        self._start = clock()
        self._shown = self._start  # when a line was last drawn or logged
        self._lock = threading.Lock()

    def add(self, nbytes: int) -> None:
        with self._lock:
            self.done += nbytes
            if self._stream is None:
                return
            now = self._clock()
            if now - self._shown < (0.2 if self._tty else PROGRESS_LOG_S):
                return
            self._shown = now
            self._show()

    def close(self) -> None:
        if self._stream is not None:
            self._show()
            if self._tty:
                self._stream.write("\n")
                self._stream.flush()

    def _show(self) -> None:
        if self._tty:
            self._stream.write("\r" + self._line())
            self._stream.flush()
        else:
            log.info("%s", self._line())

    def _line(self) -> str:
        elapsed = max(self._clock() - self._start, 1e-9)
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return (
            f"downloading {self.label}: {self.done / 1e9:.2f} of {self.total / 1e9:.2f} GB "
            f"({pct:.0f}%, {self.done / elapsed / 1e6:.1f} MB/s)"
        )
