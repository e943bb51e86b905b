"""ZeroMQ CURVE for the policy server's ZMQ sockets: keys, socket options, the allow-list, identities.

CURVE authenticates both ends and encrypts the connection; the allow-list is enforced by pyzmq's own
ZAP authenticator (`zmq.auth.thread.ThreadAuthenticator`), not by checks of ours: a client whose
public key is not in the clients folder fails the handshake, so the server never sees a byte from
it. The authenticator gives every accepted connection a User-Id, the Z85 text of the client's
public key, which libzmq attaches to each message received on it (`user_id`); the server binds a
robot's session and refresh topic to it (`session_key`), so a robot cannot reach another robot's
session by naming it.

Keys are ZeroMQ certificate files as `zmq.auth.create_certificates` writes them (`python -m
runtime.keys`): `NAME.key` holds the public key, `NAME.key_secret` both. Every loader raises
`CurveError` with one line naming the file and what is wrong with it.

Socket options are read by libzmq when a socket binds or connects, so `apply_server` and
`apply_client` are called before that; an endpoint bound before `apply_server` stays plain (the
server's internal `ipc://` XPUB endpoint, reached only by its own gateways).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import stat
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

log = logging.getLogger(__name__)

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
USER_CHARS = 40  # Z85 text of a 32-byte key: the User-Id pyzmq's authenticator gives
DEFAULT_DOMAIN = "*"  # pyzmq's name for the ZAP domain of sockets that set none


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


def apply_client(socket: zmq.Socket, keys: ClientKeys) -> None:
    """Makes the connections `socket` opens from now on CURVE clients of `keys.server_public`."""
    socket.setsockopt(zmq.CURVE_SERVERKEY, keys.server_public)
    socket.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
    socket.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)


def start_authenticator(context: zmq.Context, keys: ServerKeys, domain: str = DEFAULT_DOMAIN) -> ThreadAuthenticator:
    """pyzmq's ZAP handler for every CURVE socket of `context`, admitting the keys in
    `keys.clients_dir` (as they were at start; `stop()` it when the context closes) to the sockets
    of `domain`."""
    auth = ThreadAuthenticator(context, log=logging.getLogger("transport.curve.zap"))
    auth.start()
    allow(auth, keys, domain)
    return auth


def allow(auth: ThreadAuthenticator, keys: ServerKeys, domain: str) -> None:
    """A second allow-list on a context's authenticator (a context has one), for the sockets that
    `apply_server` gave this ZAP domain: pyzmq looks a domain's keys up by its exact name, so each
    admits only its own folder's keys (a broker's workers and its robots)."""
    auth.configure_curve(domain=domain, location=str(keys.clients_dir))


def user_id(frame: zmq.Frame) -> str | None:
    """The ZAP User-Id of the connection a frame came on (received with `copy=False`): the
    client's public key under CURVE; None on a plain connection, or for a message libzmq made
    itself (an XPUB's unsubscription when a subscriber left)."""
    try:
        return frame.get("User-Id")
    except zmq.ZMQError:
        return None


def session_key(user: str | None, robot: str) -> str:
    """A robot's session key and refresh topic: its name on a plain connection, `user/robot` under
    CURVE. The user is always 40 characters, so no robot name can make one user's key another's."""
    return robot if user is None else f"{user}/{robot}"


class SubscriptionGate:
    """Which subscriptions an XPUB in manual mode (`XPUB_MANUAL`) applies, for a publisher whose
    topics are session keys: under CURVE a subscriber may subscribe only to its own `user/`
    prefix (the catch-all empty subscription included, it is refused); a plain connection (the
    server's own gateways, over `ipc://`) to anything.

    `admit(frame)` applies an accepted (un)subscription to the socket and says whether the
    publisher should count it. A refused subscription stays in libzmq's record of the subscriber,
    which reports it as an unsubscription without any User-Id when that subscriber leaves: those
    are set against the refused ones first, so a refused subscriber leaving can never lower the
    count of a topic someone holds (the count may stay high instead: that session then ends by
    its silence timeout). Explicit unsubscriptions of refused topics are ignored for the same
    reason. `max_refused` bounds what is remembered; past it, a subscriber leaving lowers no
    count (still never too low)."""

    def __init__(self, socket: zmq.Socket, max_refused: int = 65536):
        self._socket = socket
        self._max_refused = max_refused
        self._refused: collections.Counter[bytes] = collections.Counter()
        self._forgetful = False
        self.refused = 0

    @property
    def held_refused(self) -> int:
        """Refused subscriptions whose subscribers have not (as far as is known) left."""
        return sum(self._refused.values())

    def admit(self, frame: zmq.Frame) -> bool:
        msg = frame.bytes
        subscribe, topic = msg[0] == 1, msg[1:]
        user = user_id(frame)
        own = user is None or topic.startswith(f"{user}/".encode())
        if subscribe:
            if own:
                self._socket.setsockopt(zmq.SUBSCRIBE, topic)
                return True
            self.refused += 1
            log.info("refused user %s a subscription to %r: not its own topic", user, topic[:60])
            if topic in self._refused or len(self._refused) < self._max_refused:
                self._refused[topic] += 1
            else:
                self._forgetful = True
            return False
        if user is not None:  # an explicit unsubscription from a CURVE subscriber
            if own:
                self._socket.setsockopt(zmq.UNSUBSCRIBE, topic)
            return own
        if self._refused[topic] > 0:
            self._refused[topic] -= 1
            if not self._refused[topic]:
                del self._refused[topic]
            return False
        self._socket.setsockopt(zmq.UNSUBSCRIBE, topic)  # a gateway's own; a no-op for one that left
        return not self._forgetful
