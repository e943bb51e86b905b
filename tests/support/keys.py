"""Credentials for the security tests, made in a test's temporary folder: CURVE key pairs (with
`runtime.keys`) and a self-signed TLS certificate."""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import shutil
from pathlib import Path

import pytest
import zmq

from runtime.keys import create_pair
from transport import codec
from transport.curve import ClientKeys, apply_client, load_client_keys


@dataclasses.dataclass(frozen=True)
class Keys:
    """A server pair, a clients folder allowing `robot-a` and `robot-b`, and a `stranger` pair
    that is not on the list."""

    root: Path

    @property
    def server_secret(self) -> Path:
        return self.root / "server.key_secret"

    @property
    def clients(self) -> Path:
        return self.root / "clients"

    def client(self, name: str) -> ClientKeys:
        return load_client_keys(self.root / "server.key", self.root / f"{name}.key_secret")

    def server_flags(self) -> list[str]:
        return ["--curve-secret", str(self.server_secret), "--curve-clients", str(self.clients)]


def make_keys(root: Path) -> Keys:
    for name in ("server", "robot-a", "robot-b", "stranger"):
        create_pair(root, name)
    (root / "clients").mkdir()
    for name in ("robot-a", "robot-b"):
        shutil.copy(root / f"{name}.key", root / "clients")
    return Keys(root)


def self_signed_cert(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, PEM files; the test skips where the `cryptography`
    package is missing."""
    pytest.importorskip("cryptography", reason="making a test certificate needs the cryptography package")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


# Waiting this long without a reply is how a refused client is recognised; a reply within it is the
# failure (so it bounds detection, it asserts no timing).
REFUSED_WATCH_S = 2.0


def any_reply(endpoint: str, keys: ClientKeys | None) -> bool:
    """Whether a raw DEALER (CURVE with `keys`, plain without) gets any reply to a ping."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        apply_client(sock, keys)
    sock.connect(endpoint)
    try:
        sock.send_multipart(codec.encode({"type": "ping", "id": 1}))
        return bool(sock.poll(int(REFUSED_WATCH_S * 1e3)))
    finally:
        sock.close()
