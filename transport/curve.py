"""ZeroMQ CURVE for the policy server's ZMQ sockets: keys, socket options, the allow-list, identities.

CURVE authenticates both ends and encrypts the connection; the allow-list is enforced during the
handshake by the context's ZAP handler (`transport.zap`, which also names each connection): a client
whose public key is not in the clients folder fails the handshake, so the server never sees a byte
from it. The handler gives every accepted connection a User-Id, the Z85 text of the client's public
key, which libzmq attaches to each message received on it (`user_id`); the server binds a robot's
session and refresh topic to it (`session_key`), so a robot cannot reach another robot's session by
naming it.

Keys are ZeroMQ certificate files as `zmq.auth.create_certificates` writes them (`python -m
runtime.keys`): `NAME.key` holds the public key, `NAME.key_secret` both. Every loader raises
`CurveError` with one line naming the file and what is wrong with it.

Socket options are read by libzmq when a socket binds or connects, so `apply_server` and
`apply_client` are called before that; an endpoint bound before `apply_server` stays plain (the
server's internal `ipc://` XPUB endpoint, reached only by its own gateways).
"""

from __future__ import annotations

import dataclasses
import logging
import stat
from collections.abc import Sequence
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85

from transport import zap
from transport.zap import ZapHandler

log = logging.getLogger(__name__)

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
USER_CHARS = 40  # Z85 text of a 32-byte key: the User-Id pyzmq's authenticator gives
DEFAULT_DOMAIN = zap.DEFAULT_DOMAIN


class CurveError(ValueError):
    """A key file or folder that cannot be used; the message is one line naming it."""


@dataclasses.dataclass(frozen=True)
class ServerKeys:
    """The server's key pair and the folder of client public keys allowed in."""

    public: bytes
    secret: bytes
    clients_dir: Path
    clients: int  # how many allowed keys the folder held when loaded


@dataclasses.dataclass(frozen=True)
class ClientKeys:
    """A client's key pair and the public key of the server it expects (anyone else is refused)."""

    server_public: bytes
    public: bytes
    secret: bytes

    @property
    def user(self) -> str:
        """What the server knows this client as: its public key, Z85 (the ZAP User-Id)."""
        return self.public.decode("ascii")


def _key(text: bytes | None, path: Path, what: str, hint: str = "is it from `python -m runtime.keys`?") -> bytes:
    if text is None:
        raise CurveError(f"{path}: no {what} in this file ({hint})")
    try:
        if len(text) != USER_CHARS or len(z85.decode(text)) != 32:
            raise ValueError
    except ValueError:
        raise CurveError(f"{path}: the {what} is not a 40-character Z85 CURVE key") from None
    return text


def _read(path: str | Path) -> tuple[Path, bytes | None, bytes | None]:
    path = Path(path)
    if not path.is_file():
        raise CurveError(f"{path}: no such key file")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except ValueError:  # no public key line: the caller says what is missing
        return path, None, None
    except OSError as e:
        raise CurveError(f"{path}: cannot read it ({e.strerror or e})") from None
    return path, public, secret


def load_public(path: str | Path) -> bytes:
    """The public key of a certificate (`NAME.key`, or the public line of a `NAME.key_secret`)."""
    path, public, _ = _read(path)
    return _key(public, path, "public key")


def load_pair(path: str | Path) -> tuple[bytes, bytes]:
    """(public, secret) of a `NAME.key_secret`; checks that the two belong together."""
    path, public, secret = _read(path)
    public = _key(public, path, "public key")
    secret = _key(secret, path, "secret key", f"give the NAME{SECRET_SUFFIX} file, not NAME{PUBLIC_SUFFIX}")
    if zmq.curve_public(secret) != public:
        raise CurveError(f"{path}: the public key does not belong to the secret key (the file is damaged)")
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s holds a secret key and others may read it (chmod 600 %s)", path, path)
    return public, secret


def load_server_keys(secret_file: str | Path, clients_dir: str | Path) -> ServerKeys:
    """The server's pair (`--curve-secret`) and its allow-list (`--curve-clients`): every `*.key`
    in the folder is read now, so a garbled one is reported at start, not as a refused robot."""
    public, secret = load_pair(secret_file)
    folder = Path(clients_dir)
    if not folder.is_dir():
        raise CurveError(f"{folder}: no such folder of client public keys")
    keys = sorted(folder.glob(f"*{PUBLIC_SUFFIX}"))
    for path in keys:
        load_public(path)
    if not keys:
        raise CurveError(f"{folder}: no client public keys (*{PUBLIC_SUFFIX}) in it: no robot could connect")
    return ServerKeys(public, secret, folder, len(keys))


def load_client_keys(server_key_file: str | Path, key_file: str | Path) -> ClientKeys:
    """The server's public key (`--curve-server-key`) and the client's pair (`--curve-key`, its
    `.key_secret`)."""
    server_public = load_public(server_key_file)
    public, secret = load_pair(key_file)
    return ClientKeys(server_public, public, secret)


def apply_server(socket: zmq.Socket, keys: ServerKeys, domain: str = DEFAULT_DOMAIN) -> None:
    """Makes the endpoints `socket` binds from now on CURVE servers, their clients checked against
    the allow-list of `domain` (`start_authenticator`, `allow`)."""
    if domain != DEFAULT_DOMAIN:
        socket.setsockopt(zmq.ZAP_DOMAIN, domain.encode())
    socket.setsockopt(zmq.CURVE_SERVER, 1)
    socket.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
    socket.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)


def bind(
    socket: zmq.Socket, endpoints: Sequence[str], keys: ServerKeys | None, domain: str = DEFAULT_DOMAIN
) -> list[str]:
    """Binds `socket` to `endpoints`, its tcp ones CURVE servers of `keys` (none: all plain); what each
    is bound to, in their order (a tcp port 0 or `*` resolved). The local ones (ipc, inproc) are bound
    first: CURVE applies to the endpoints bound after it is set, and only a host's own processes reach
    those."""
    bound: dict[str, str] = {}
    for endpoint in sorted(endpoints, key=lambda e: e.startswith("tcp://")):
        if keys is not None and endpoint.startswith("tcp://") and not socket.getsockopt(zmq.CURVE_SERVER):
            apply_server(socket, keys, domain)
        socket.bind(endpoint)
        bound[endpoint] = socket.getsockopt_string(zmq.LAST_ENDPOINT)
    return [bound[e] for e in endpoints]


def apply_client(socket: zmq.Socket, keys: ClientKeys) -> None:
    """Makes the connections `socket` opens from now on CURVE clients of `keys.server_public`."""
    socket.setsockopt(zmq.CURVE_SERVERKEY, keys.server_public)
    socket.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
    socket.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)


def start_authenticator(context: zmq.Context, keys: ServerKeys | None = None, *domains: str) -> ZapHandler:
    """The ZAP handler of `context` (`stop()` it before the context closes), admitting the keys in
    `keys.clients_dir` (as they are now) to the sockets of each of `domains` (the default one
    without any)."""
    handler = ZapHandler(context)
    handler.start()
    if keys is not None:
        for domain in domains or (DEFAULT_DOMAIN,):
            allow(handler, keys, domain)
    return handler


def allow(handler: ZapHandler, keys: ServerKeys, domain: str) -> None:
    """An allow-list on a context's ZAP handler (a context has one), for the sockets that
    `apply_server` gave this ZAP domain: each domain admits only its own folder's keys (a broker's
    workers and its robots)."""
    handler.allow(domain, keys.clients_dir)


def user_id(frame: zmq.Frame) -> str | None:
    """The ZAP User-Id of the connection a frame came on (received with `copy=False`): the
    client's public key under CURVE; None on a plain connection, or for a message libzmq made
    itself (an XPUB's unsubscription when a subscriber left)."""
    try:
        return frame.get("User-Id") or None
    except zmq.ZMQError:
        return None


def session_key(user: str | None, robot: str) -> str:
    """A robot's session key and refresh topic: its name on a plain connection, `user/robot` under
    CURVE. The user is always 40 characters, so no robot name can make one user's key another's."""
    return robot if user is None else f"{user}/{robot}"
