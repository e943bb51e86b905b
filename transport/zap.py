"""The ZAP handler of a ZMQ context (rfc.zeromq.org/spec/27): who may connect, and a name for each connection.

libzmq asks the context's ZAP handler about every connection that a socket with CURVE (or with a ZAP
domain) accepts, and attaches what the handler answers to every message the connection sends. This
handler answers two things:

- **Who may connect.** A CURVE client is admitted when its public key is in the allow-list of the
  socket's ZAP domain (`allow`: the `*.key` files of a folder, read when allowed; a domain has one
  list, so robots' keys never admit a worker); its User-Id is the key, Z85 (`transport.curve`).
  A NULL connection (a socket that sets a ZAP domain without CURVE) is admitted.
- **Which connection a message came on.** Every admitted connection gets a number of its own, the
  metadata property `X-Connection`. libzmq gives messages no other mark of their connection (a
  peer's address names its host, not its connection), and a publisher needs one: to know whose
  subscription an unsubscription may end, and to drop what a closed connection had queued without
  dropping what the same host sends on a new one (`transport.subscriptions`).

The handler runs on a thread of its own; `stop()` ends it before the context is terminated.
"""

from __future__ import annotations

import logging
import struct
import threading
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85

log = logging.getLogger(__name__)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # fixed by the ZAP specification
DEFAULT_DOMAIN = "*"  # the domain of sockets that set none (pyzmq's name for it, kept)
CONNECTION = "X-Connection"  # the metadata property naming a connection
_VERSION = b"1.0"


def _metadata(properties: dict[str, str]) -> bytes:
    """ZMTP's property list: a name (1-byte length), a value (4-byte length), and so on."""
    out = b""
    for name, value in properties.items():
        raw = value.encode()
        out += bytes([len(name)]) + name.encode() + struct.pack(">I", len(raw)) + raw
    return out


def connection_of(frame: zmq.Frame) -> str | None:
    """The `X-Connection` of the connection a frame came on (received with `copy=False`); None for
    a message libzmq made itself, or from a socket without a ZAP domain."""
    try:
        return frame.get(CONNECTION)
    except zmq.ZMQError:
        return None


class ZapHandler:
    """`start()` binds the context's ZAP endpoint (one per context) and answers on a thread."""

    def __init__(self, context: zmq.Context):
        self._context = context
        self._allowed: dict[str, frozenset[bytes]] = {}  # ZAP domain -> Z85 public keys
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop_endpoint = f"inproc://zap-stop-{id(self)}"
        self._bound = threading.Event()
        self._error: BaseException | None = None
        self.connections = 0  # admitted so far: the last number given
        self.refused = 0

    def allow(self, domain: str, clients_dir: str | Path) -> int:
        """Admits to the sockets of ZAP `domain` the CURVE keys in `clients_dir` (as they are now);
        returns how many."""
        keys = frozenset(zmq.auth.load_certificates(str(clients_dir)))
        with self._lock:
            self._allowed[domain] = keys
        return len(keys)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="zap-handler", daemon=True)
        self._thread.start()
        self._bound.wait()
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        if self._thread is None:
            return
        stop = self._context.socket(zmq.PAIR)
        stop.setsockopt(zmq.LINGER, 0)
        stop.connect(self._stop_endpoint)
        stop.send(b"")
        self._thread.join(10)
        stop.close()
        self._thread = None

    def _run(self) -> None:
        try:
            zap = self._context.socket(zmq.REP)
            zap.setsockopt(zmq.LINGER, 0)
            zap.bind(ZAP_ENDPOINT)
            control = self._context.socket(zmq.PAIR)
            control.setsockopt(zmq.LINGER, 0)
            control.bind(self._stop_endpoint)
        except zmq.ZMQError as e:
            self._error = e
            self._bound.set()
            return
        self._bound.set()
        poller = zmq.Poller()
        poller.register(zap, zmq.POLLIN)
        poller.register(control, zmq.POLLIN)
        try:
            while True:
                ready = dict(poller.poll())
                if control in ready:
                    return
                if zap in ready:
                    zap.send_multipart(self._answer(zap.recv_multipart()))
        finally:
            zap.close(linger=0)
            control.close(linger=0)

    def _answer(self, request: list[bytes]) -> list[bytes]:
        """The reply to one ZAP request: version, request id, status, text, User-Id, metadata."""
        if len(request) < 6 or request[0] != _VERSION:
            request_id = request[1] if len(request) > 1 else b""
            return [_VERSION, request_id, b"400", b"malformed ZAP request", b"", b""]
        request_id, mechanism, credentials = request[1], request[5], request[6:]
        domain = request[2].decode(errors="replace") or DEFAULT_DOMAIN
        user = b""
        if mechanism == b"CURVE":
            key = z85.encode(credentials[0]) if len(credentials) == 1 and len(credentials[0]) == 32 else None
            with self._lock:
                allowed = self._allowed.get(domain, frozenset())
            if key is None or key not in allowed:
                self.refused += 1
                log.info("refused a CURVE key %r on ZAP domain %r: not on its allow-list", key, domain)
                return [_VERSION, request_id, b"400", b"key not allowed", b"", b""]
            user = key
        elif mechanism != b"NULL":
            self.refused += 1
            return [_VERSION, request_id, b"400", b"mechanism not offered", b"", b""]
        self.connections += 1
        return [_VERSION, request_id, b"200", b"OK", user, _metadata({CONNECTION: str(self.connections)})]
