"""`python -m runtime.keys` and the key loaders of `transport.curve`: ZeroMQ's certificate format,
no overwriting, secrets readable by their owner only, one-line errors for unusable files."""

from __future__ import annotations

import stat

import pytest
import zmq
import zmq.auth

from runtime import keys as keys_cli
from transport.curve import CurveError, load_client_keys, load_pair, load_public, load_server_keys


def test_writes_a_pair_in_zeromq_format_and_never_overwrites(tmp_path, capsys):
    folder = tmp_path / "new"
    assert keys_cli.main([str(folder), "robot-1"]) == 0
    public, secret = zmq.auth.load_certificate(folder / "robot-1.key_secret")
    assert zmq.auth.load_certificate(folder / "robot-1.key") == (public, None)
    assert zmq.curve_public(secret) == public
    assert stat.S_IMODE((folder / "robot-1.key_secret").stat().st_mode) == 0o600
    before = (folder / "robot-1.key_secret").read_bytes()
    assert keys_cli.main([str(folder), "robot-1"]) == 2
    assert "not overwriting" in capsys.readouterr().err
    assert (folder / "robot-1.key_secret").read_bytes() == before
    for bad in ("", "../up", ".hidden", "a/b"):
        assert keys_cli.main([str(folder), bad]) == 2
        assert "not a usable key name" in capsys.readouterr().err


def test_unusable_key_files_are_named_in_one_line(tmp_path):
    keys_cli.create_pair(tmp_path, "server")
    keys_cli.create_pair(tmp_path, "robot")
    with pytest.raises(CurveError, match="no such key file"):
        load_public(tmp_path / "missing.key")
    with pytest.raises(CurveError, match=r"not NAME\.key"):
        load_pair(tmp_path / "server.key")
    garbled = tmp_path / "garbled.key"
    garbled.write_text('public-key = "not a key"\n')
    with pytest.raises(CurveError, match="not a 40-character Z85 CURVE key"):
        load_public(garbled)
    (tmp_path / "empty.key").write_text("# nothing\n")
    with pytest.raises(CurveError, match="no public key"):
        load_public(tmp_path / "empty.key")
    # A secret file whose public line was edited: the pair no longer belongs together.
    other_public = (tmp_path / "robot.key").read_text().split("public-key = ")[1].splitlines()[0]
    lines = (tmp_path / "server.key_secret").read_text().splitlines()
    mixed = tmp_path / "mixed.key_secret"
    mixed.write_text("\n".join(f"    public-key = {other_public}" if "public-key" in x else x for x in lines))
    with pytest.raises(CurveError, match="does not belong"):
        load_pair(mixed)
    clients = tmp_path / "clients"
    with pytest.raises(CurveError, match="no such folder"):
        load_server_keys(tmp_path / "server.key_secret", clients)
    clients.mkdir()
    with pytest.raises(CurveError, match="no client public keys"):
        load_server_keys(tmp_path / "server.key_secret", clients)
    (clients / "bad.key").write_text('public-key = "short"\n')
    with pytest.raises(CurveError, match=r"bad\.key"):
        load_server_keys(tmp_path / "server.key_secret", clients)
    (clients / "bad.key").unlink()
    (clients / "robot.key").write_bytes((tmp_path / "robot.key").read_bytes())
    assert load_server_keys(tmp_path / "server.key_secret", clients).clients == 1
    client = load_client_keys(tmp_path / "server.key", tmp_path / "robot.key_secret")
    assert len(client.user) == 40 and client.user.encode() == client.public
