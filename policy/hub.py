"""`hf://OWNER/REPO[@REVISION]`: a checkpoint on the Hugging Face hub, in huggingface_hub's cache.

Fetched through huggingface_hub itself, into its standard cache (`HF_HOME`, `HF_HUB_CACHE`), so
that a model LeRobot (or anything else) already downloaded is reused and ours is reused by them;
`HF_TOKEN` opens private and gated repos, `HF_HUB_OFFLINE=1` reads the cache alone, and the
download shows huggingface_hub's progress bars. Only the files a checkpoint needs are fetched, in
two steps: the small ones first (the configs, LeRobot's processors and their statistics, openpi's
`assets/*/norm_stats.json`), so that the checkpoint is checked (with the weights' safetensors
header, read by a range request) before the weights are.

Offline, huggingface_hub retries and waits on each request: the hub's host is probed first, once,
as `download` probes any remote (`download.probe`), and a repo that is neither reachable nor
cached is one `DownloadError` line naming it and the command that fetches it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import urllib.parse
from pathlib import Path

from policy import download, torch_checkpoint
from policy.lerobot_config import CONFIG

log = logging.getLogger(__name__)

SCHEME = "hf://"
# huggingface_hub's names: OWNER/REPO, letters, digits, `-`, `_`, `.`; a revision is a branch,
# tag or commit (branch names may hold `/`).
_REF = re.compile(r"^hf://(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<revision>[\w./-]+))?/?$")
SMALL_FILES = (
    CONFIG,
    "policy_preprocessor*.json",
    "policy_postprocessor*.json",
    "policy_preprocessor_step_*.safetensors",
    "policy_postprocessor_step_*.safetensors",
    "assets/*/norm_stats.json",
)


@dataclasses.dataclass(frozen=True)
class HubRef:
    repo_id: str
    revision: str | None

    def __str__(self) -> str:
        return f"{SCHEME}{self.repo_id}" + (f"@{self.revision}" if self.revision else "")

    @property
    def by_hand(self) -> str:
        """The command that fetches it into the cache where the hub is reachable."""
        revision = f" --revision {self.revision}" if self.revision else ""
        return (
            f"fetch it where the hub is reachable with `hf download {self.repo_id}{revision}` (HF_TOKEN for a "
            "private repo) into the same HF_HOME, or download the folder and pass it as --checkpoint"
        )


def is_hub(location: str | os.PathLike) -> bool:
    return os.fspath(location).startswith(SCHEME)


def parse(location: str | os.PathLike) -> HubRef:
    """`hf://OWNER/REPO[@REVISION]`, or `ValueError` saying what a hub location looks like."""
    match = _REF.match(os.fspath(location))
    if match is None:
        raise ValueError(f"{os.fspath(location)!r} is not a hub location: expected hf://OWNER/REPO[@REVISION]")
    return HubRef(match["repo"], match["revision"])


def _offline() -> bool:
    """HF_HUB_OFFLINE, read now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE")
    return constants.HF_HUB_OFFLINE if value is None else value.strip().upper() in ("1", "ON", "YES", "TRUE")


def _endpoint() -> tuple[str, int]:
    from huggingface_hub import constants

    parts = urllib.parse.urlsplit(constants.ENDPOINT)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


def snapshot(location: str | os.PathLike, *, weights: bool) -> Path:
    """The local snapshot folder of a hub checkpoint with its small files (and, with `weights`,
    `model.safetensors`), fetched into huggingface_hub's cache where missing. Raises
    `download.DownloadError`, one line naming the repo: unreachable and not cached, not found
    (or private without HF_TOKEN), or offline without the files."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    ref = parse(location)
    patterns = [*SMALL_FILES, torch_checkpoint.WEIGHTS] if weights else list(SMALL_FILES)
    offline = _offline()
    if not offline:
        try:
            download.probe(_endpoint(), str(ref), ref.by_hand)
        except download.DownloadError as unreachable:
            try:
                folder = _cached(ref, patterns)
            except download.DownloadError:
                raise unreachable from None
            log.warning("%s: the hub is unreachable; using the cached snapshot %s", ref, folder)
            return folder
    try:
        folder = Path(
            snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=patterns, local_files_only=offline)
        )
    except RepositoryNotFoundError:
        raise download.DownloadError(
            f"{ref}: no such repo on the hub, or a private one: set HF_TOKEN to a token that can read it"
        ) from None
    except LocalEntryNotFoundError:
        raise download.DownloadError(
            f"{ref} is not in the Hugging Face cache and HF_HUB_OFFLINE is set; {ref.by_hand}"
        ) from None
    except (HfHubHTTPError, OSError) as e:
        raise download.DownloadError(f"cannot fetch {ref}: {type(e).__name__}: {e}; {ref.by_hand}") from None
    _check_complete(ref, folder, weights)
    return folder


def _cached(ref: HubRef, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(
            snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=patterns, local_files_only=True)
        )
    except LocalEntryNotFoundError:
        raise download.DownloadError(f"{ref} is not in the Hugging Face cache") from None
    _check_complete(ref, folder, torch_checkpoint.WEIGHTS in patterns)
    return folder


def _check_complete(ref: HubRef, folder: Path, weights: bool) -> None:
    """A cached snapshot may hold only some files (fetched by another program's patterns)."""
    for name in (CONFIG, torch_checkpoint.WEIGHTS) if weights else (CONFIG,):
        if not (folder / name).is_file():
            raise download.DownloadError(f"{ref}: the cached snapshot {folder} has no {name}; {ref.by_hand}")


def weights_header(location: str | os.PathLike) -> dict[str, torch_checkpoint.Tensor]:
    """The names, dtypes and shapes of the repo's `model.safetensors`, read from the hub by a range
    request of its header (huggingface_hub's `get_safetensors_metadata`), without its weights."""
    from huggingface_hub import get_safetensors_metadata
    from huggingface_hub.errors import HfHubHTTPError, NotASafetensorsRepoError

    ref = parse(location)
    try:
        metadata = get_safetensors_metadata(ref.repo_id, revision=ref.revision)
    except NotASafetensorsRepoError:
        raise download.DownloadError(f"{ref}: the repo has no {torch_checkpoint.WEIGHTS}") from None
    except (HfHubHTTPError, OSError) as e:
        raise download.DownloadError(f"cannot read {ref}'s weights header: {type(e).__name__}: {e}") from None
    files = metadata.files_metadata
    if torch_checkpoint.WEIGHTS not in files:
        raise download.DownloadError(f"{ref}: the weights are {sorted(files)}, not one {torch_checkpoint.WEIGHTS}")
    return {
        name: torch_checkpoint.Tensor(t.dtype, tuple(t.shape))
        for name, t in files[torch_checkpoint.WEIGHTS].tensors.items()
    }
