"""A ZMTP 3.0 peer written over a plain TCP socket, for the hostile tests of the subscription side.

The attacking side of a test must not run libzmq's own subscription code: a subscriber's libzmq keeps
(and on teardown walks) the same per-byte tries that the attack aims at, so a test that subscribes
megabytes through pyzmq could crash itself rather than the server. This peer speaks just enough of
ZMTP (rfc.zeromq.org/spec/23: greeting, the NULL mechanism's READY, frames) to send any subscription
message, of any size, and to read what the publisher sends back.
"""

from __future__ import annotations

import socket
import struct
import time

_GREETING = b"\xff" + bytes(8) + b"\x7f" + bytes([3, 0]) + b"NULL".ljust(20, b"\x00") + b"\x00" + bytes(31)
_MORE, _LONG, _COMMAND = 0x01, 0x02, 0x04


def _frame(body: bytes, flags: int = 0) -> bytes:
    if len(body) > 255:
        return bytes([flags | _LONG]) + struct.pack(">Q", len(body)) + body
    return bytes([flags, len(body)]) + body


def _command(name: bytes, properties: dict[bytes, bytes]) -> bytes:
    body = bytes([len(name)]) + name
    for key, value in properties.items():
        body += bytes([len(key)]) + key + struct.pack(">I", len(value)) + value
    return _frame(body, _COMMAND)


class RawPeer:
    """A connection to a ZMQ endpoint (`tcp://127.0.0.1:PORT`) as a peer of `socket_type` (SUB or
    XSUB for a publisher), after a completed NULL handshake. `source` binds the local end first (a
    127.0.0.x address: another host, as the server sees it)."""

    def __init__(self, endpoint: str, socket_type: bytes = b"SUB", source: str | None = None, timeout_s: float = 10.0):
        host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.settimeout(timeout_s)
        if source is not None:
            self.sock.bind((source, 0))
        self.sock.connect((host, int(port)))
        self.sock.sendall(_GREETING)
        self._read_exactly(64)
        self.sock.sendall(_command(b"READY", {b"Socket-Type": socket_type}))
        self._read_frame()  # the publisher's READY

    def _read_exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("the peer closed the connection")
            data += chunk
        return data

    def _read_frame(self) -> tuple[int, bytes]:
        flags = self._read_exactly(1)[0]
        size = struct.unpack(">Q", self._read_exactly(8))[0] if flags & _LONG else self._read_exactly(1)[0]
        return flags, self._read_exactly(size)

    def subscribe(self, topic: bytes) -> bool:
        """Whether it was sent whole (False: the other end closed the connection meanwhile)."""
        return self.send_raw(_frame(b"\x01" + topic))

    def unsubscribe(self, topic: bytes) -> bool:
        return self.send_raw(_frame(b"\x00" + topic))

    def send_raw(self, data: bytes) -> bool:
        """Bytes as they are (several frames at once, or a flood); whether they were sent whole."""
        try:
            self.sock.sendall(data)
            return True
        except (ConnectionResetError, BrokenPipeError):
            return False

    @staticmethod
    def subscription(topic: bytes, subscribe: bool = True) -> bytes:
        """The wire bytes of one (un)subscription, to batch many into one `send_raw`."""
        return _frame(bytes([subscribe]) + topic)

    @staticmethod
    def message(body: bytes) -> bytes:
        """The wire bytes of one single-frame message (to an XPUB: a subscription if it starts with
        0 or 1, else an upstream message)."""
        return _frame(body)

    def receive(self, timeout_s: float) -> list[bytes] | None:
        """The next message's frames (commands skipped), or None if nothing came in time."""
        self.sock.settimeout(timeout_s)
        try:
            frames: list[bytes] = []
            while True:
                flags, body = self._read_frame()
                if flags & _COMMAND:
                    continue
                frames.append(body)
                if not flags & _MORE:
                    return frames
        except TimeoutError:
            return None

    def closed_by_peer(self, timeout_s: float) -> bool:
        """Whether the other end closes this connection within `timeout_s` (what it sends is read and
        dropped meanwhile)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                if not self.sock.recv(65536):
                    return True
            except TimeoutError:
                return False
            except OSError:
                return True
        return False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
