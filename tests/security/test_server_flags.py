"""The policy server's access flags: they go in pairs, a bad file is a one-line start-up error
before anything binds, and binding beyond loopback without protection is warned about."""

from __future__ import annotations

import logging

import pytest

from runtime.policy_server import main as policy_server
from runtime.policy_server.flags import parse_args
from tests.support.keys import make_keys, self_signed_cert


@pytest.mark.parametrize(
    ("flags", "error"),
    [
        (["--curve-secret", "s.key_secret"], "--curve-secret and --curve-clients go together"),
        (["--curve-clients", "clients"], "--curve-secret and --curve-clients go together"),
        (["--tls-cert", "cert.pem"], "--tls-cert and --tls-key go together"),
        (["--demo", "--curve-secret", "s", "--curve-clients", "c"], "cannot be combined with --curve-secret"),
    ],
)
def test_flags_that_go_together(flags, error, capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(flags)
    assert info.value.code == 2
    assert error in capsys.readouterr().err


def _warnings(caplog, argv: list[str]) -> list[str]:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="runtime.policy_server.main"):
        policy_server.check_access(parse_args(argv))
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_exposure_beyond_loopback_is_warned_about(tmp_path, caplog):
    keys = make_keys(tmp_path)
    token = tmp_path / "token"
    token.write_text("t" * 32)
    cert, key = self_signed_cert(tmp_path)
    assert _warnings(caplog, ["--host", "127.0.0.1"]) == []
    assert _warnings(caplog, ["--host", "localhost"]) == []
    exposed = _warnings(caplog, ["--host", "0.0.0.0"])
    assert any("ZMQ endpoints on 0.0.0.0 are open" in w for w in exposed)
    assert any("WebSocket ports on 0.0.0.0 are open" in w for w in exposed)
    in_clear = _warnings(caplog, ["--host", "10.1.2.3", *keys.server_flags(), "--token-file", str(token)])
    assert len(in_clear) == 1 and "travels in clear" in in_clear[0]
    tls = ["--tls-cert", str(cert), "--tls-key", str(key)]
    assert _warnings(caplog, ["--host", "10.1.2.3", *keys.server_flags(), "--token-file", str(token), *tls]) == []
    assert _warnings(caplog, ["--host", "10.1.2.3", "--ws-port", "0", "--openpi-port", "0", *keys.server_flags()]) == []


@pytest.mark.parametrize("problem", ["missing secret", "short token", "bad certificate"])
def test_an_unusable_file_is_one_line_and_exit_code_2(tmp_path, caplog, problem):
    keys = make_keys(tmp_path)
    token = tmp_path / "token"
    token.write_text("short")
    flags = {
        "missing secret": ["--curve-secret", str(tmp_path / "none.key_secret"), "--curve-clients", str(keys.clients)],
        "short token": ["--token-file", str(token)],
        "bad certificate": ["--tls-cert", str(token), "--tls-key", str(token)],
    }[problem]
    ports = ["--router-port", "0", "--pub-port", "0", "--ws-port", "0", "--openpi-port", "0"]
    with caplog.at_level(logging.ERROR, logger="runtime.policy_server.main"):
        assert policy_server.main([*ports, "--fixed-reply", *flags]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0]
    assert {"missing secret": "none.key_secret: no such key file", "short token": "shorter than 16",
            "bad certificate": "cannot load the TLS certificate"}[problem] in errors[0]  # fmt: skip
