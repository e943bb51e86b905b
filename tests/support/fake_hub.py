"""A Hugging Face Hub on 127.0.0.1 serving one model repo, for huggingface_hub to download from.

No hub is reachable in the tests, yet the `hf://` checkpoints must be read from a cache that
huggingface_hub wrote itself, as it writes a model a user (or LeRobot) downloaded: its
`snapshot_download`, pointed here by its `endpoint`, gets what the Hub answers it. Only what it asks
for is served: a revision's commit (`/api/models/REPO/revision/REV`), the commit's file tree
(`/api/models/REPO/tree/REV`), and each file (`/REPO/resolve/REV/FILE`: HEAD for its commit, ETag
and size, GET for its bytes), at the commit and at the refs (branches, tags) naming it. As on the
Hub, a file stored in git LFS (the safetensors) has the sha256 of its bytes for ETag and the others
git's blob id, so that the blobs are named in the cache as a real download names them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import hashlib
import json
import threading
import urllib.parse
from collections.abc import Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

LFS_PATTERNS = ("*.safetensors",)  # among those the Hub's default .gitattributes stores in LFS


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclasses.dataclass(frozen=True)
class ServedFile:
    path: str
    data: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def lfs(self) -> bool:
        return any(fnmatch.fnmatch(self.path, p) for p in LFS_PATTERNS)

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else _git_blob_id(self.data)

    def tree_entry(self) -> dict[str, object]:
        """The file as the Hub's tree API lists it: an LFS file's git blob is its pointer."""
        entry: dict[str, object] = {"type": "file", "path": self.path, "size": len(self.data)}
        if not self.lfs:
            return {**entry, "oid": _git_blob_id(self.data)}
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n"
        lfs = {"oid": self.sha256, "size": len(self.data), "pointerSize": len(pointer)}
        return {**entry, "oid": _git_blob_id(pointer.encode()), "lfs": lfs}


class _Hub(ThreadingHTTPServer):
    def __init__(self, repo_id: str, files: dict[str, ServedFile], commit: str, refs: Iterable[str]):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.repo_id = repo_id
        self.files = files
        self.commit = commit
        self.revisions = {commit, *refs}


class _Handler(BaseHTTPRequestHandler):
    server: _Hub

    def do_HEAD(self) -> None:
        self._answer(with_body=False)

    def do_GET(self) -> None:
        self._answer(with_body=True)

    def _answer(self, *, with_body: bool) -> None:
        path = urllib.parse.urlsplit(self.path).path
        found = self._find(path)
        if found is None:
            self._send(b"", {"X-Error-Message": f"not served here: {path}"}, with_body, status=404)
        else:
            self._send(*found, with_body)

    def _find(self, path: str) -> tuple[bytes, dict[str, str]] | None:
        """The body and headers the Hub answers `path` with; None where it would answer 404."""
        hub = self.server
        api, resolve = f"/api/models/{hub.repo_id}/", f"/{hub.repo_id}/resolve/"
        if path.startswith(api):
            kind, _, revision = path.removeprefix(api).partition("/")
            if urllib.parse.unquote(revision) not in hub.revisions:
                return None
            if kind == "revision":
                info = {"id": hub.repo_id, "sha": hub.commit, "siblings": [{"rfilename": n} for n in hub.files]}
                return json.dumps(info).encode(), {"Content-Type": "application/json"}
            if kind == "tree":
                tree = [f.tree_entry() for f in hub.files.values()]
                return json.dumps(tree).encode(), {"Content-Type": "application/json"}
        elif path.startswith(resolve):
            revision, _, name = path.removeprefix(resolve).partition("/")
            file = hub.files.get(urllib.parse.unquote(name))
            if urllib.parse.unquote(revision) in hub.revisions and file is not None:
                headers = {"X-Repo-Commit": hub.commit, "ETag": f'"{file.etag}"'}
                if file.lfs:
                    headers |= {"X-Linked-Etag": f'"{file.etag}"', "X-Linked-Size": str(len(file.data))}
                return file.data, headers
        return None

    def _send(self, body: bytes, headers: dict[str, str], with_body: bool, status: int = 200) -> None:
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(name, value)
        self.end_headers()
        if with_body:
            self.wfile.write(body)


@contextlib.contextmanager
def serving(repo_id: str, folder: Path, commit: str, refs: Iterable[str]) -> Iterator[str]:
    """`folder`'s files, as `repo_id` at `commit` named by `refs`, served on 127.0.0.1 (a port the
    kernel picks) while in the block; its endpoint URL."""
    served = [
        ServedFile(p.relative_to(folder).as_posix(), p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()
    ]
    files = {f.path: f for f in served}
    hub = _Hub(repo_id, files, commit, refs)
    thread = threading.Thread(target=hub.serve_forever, name="fake-hub", daemon=True)
    thread.start()
    try:
        host, port = hub.server_address[:2]
        yield f"http://{host}:{port}"
    finally:
        hub.shutdown()
        thread.join()
        hub.server_close()
