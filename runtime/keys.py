"""`python -m runtime.keys DIR NAME`: a CURVE key pair for the server or a robot.

Writes `DIR/NAME.key` (the public key: give the server's to robots, copy a robot's into the
server's `--curve-clients` folder) and `DIR/NAME.key_secret` (both keys: it stays on its machine,
readable by its owner only), in ZeroMQ's certificate format (`zmq.auth.create_certificates`).
An existing pair is never overwritten: replacing a key is removing the old files on purpose.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import zmq
import zmq.auth

from transport.curve import PUBLIC_SUFFIX, SECRET_SUFFIX


class KeysError(ValueError):
    """Why no key pair was written; one line."""


@contextlib.contextmanager
def _private_files() -> Iterator[None]:
    """Files created meanwhile are readable by their owner only (the secret is never, even
    briefly, readable by others)."""
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)


def create_pair(folder: str | Path, name: str) -> tuple[Path, Path]:
    """Writes NAME.key and NAME.key_secret into `folder` (created if missing); their paths."""
    if not zmq.has("curve"):
        raise KeysError("this libzmq was built without CURVE support")
    if not name or name.startswith(".") or any(c in name for c in "/\\\0") or name != name.strip():
        raise KeysError(f"{name!r} is not a usable key name (a plain file name such as 'robot-1')")
    folder = Path(folder)
    public, secret = folder / f"{name}{PUBLIC_SUFFIX}", folder / f"{name}{SECRET_SUFFIX}"
    for path in (public, secret):
        if path.exists():
            raise KeysError(f"{path} exists; not overwriting a key (remove it first to replace it)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with _private_files():
            written = zmq.auth.create_certificates(folder, name)
        os.chmod(written[0], 0o644)  # the public key is meant to be copied around
    except OSError as e:
        raise KeysError(f"cannot write keys into {folder}: {e.strerror or e}") from None
    return Path(written[0]), Path(written[1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.keys", description=__doc__.splitlines()[0])
    p.add_argument("dir", help="folder to write the key files into (created if missing)")
    p.add_argument("name", help="the key's name: NAME.key and NAME.key_secret are written")
    args = p.parse_args(argv)
    try:
        public, secret = create_pair(args.dir, args.name)
    except KeysError as e:
        print(f"runtime.keys: error: {e}", file=sys.stderr)
        return 2
    print(f"public key: {public}\nsecret key: {secret} (keep it on this machine)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
