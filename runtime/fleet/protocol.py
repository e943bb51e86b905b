"""The broker <-> worker protocol of a fleet: frames, commands and their checks (docs/protocol.md, section 6).

A worker's DEALER talks to the broker's back ROUTER in the style of the ZeroMQ guide's Paranoid
Pirate / Majordomo worker protocols: every message starts with the protocol tag and a one-byte
command; the worker announces itself with READY (its name, capacity and what its `ping` says), both
sides send HEARTBEAT every interval, and a peer silent for a few intervals is presumed dead. A
robot's request travels to the worker wrapped in an envelope that carries the robot's routing
identity, whether it came over the broker's internal ROUTER, its authenticated user (the ZAP
User-Id under CURVE) and its principal (the key, else the robot's address, which the worker's
session bounds count against), so the worker sees the same `Peer` a single server would. The request and
reply frames themselves are the robot protocol's, forwarded untouched.

Pure functions and no sockets; everything a peer sends is checked here and bounded, so a malformed
message is a `FleetProtocolError`, never an exception from deeper down.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Sequence
from typing import Any

import msgpack

PROTOCOL = b"PI05W2"
READY, REQUEST, REPLY, HEARTBEAT, DISCONNECT = b"\x01", b"\x02", b"\x03", b"\x04", b"\x05"
COMMANDS = {READY: "READY", REQUEST: "REQUEST", REPLY: "REPLY", HEARTBEAT: "HEARTBEAT", DISCONNECT: "DISCONNECT"}
INTERNAL = 0x01  # envelope flag: the robot came over the broker's internal ROUTER (a WebSocket gateway)
MAX_PAYLOAD_BYTES = 64 * 1024  # READY and HEARTBEAT maps
MAX_USER_BYTES = 256  # the user and the principal of a REQUEST's envelope
_SEQ = struct.Struct(">Q")


class FleetProtocolError(ValueError):
    """A broker or worker message that does not follow this protocol."""


@dataclasses.dataclass(frozen=True)
class Envelope:
    """What the broker adds in front of a robot's request: `seq` numbers it for the reply."""

    seq: int
    identity: bytes
    internal: bool
    user: str | None
    principal: str = ""


def _bytes(frame: Any) -> bytes:
    return frame.bytes if hasattr(frame, "bytes") else bytes(frame)


def message(command: bytes, *frames: Any) -> list[Any]:
    return [PROTOCOL, command, *frames]


def payload(data: dict[str, Any]) -> bytes:
    return msgpack.packb(data, use_bin_type=True)


def split(frames: Sequence[Any]) -> tuple[bytes, list[Any]]:
    """(command, the frames after it) of a message; raises `FleetProtocolError`."""
    if len(frames) < 2 or _bytes(frames[0]) != PROTOCOL:
        raise FleetProtocolError(f"not a {PROTOCOL.decode()} message")
    command = _bytes(frames[1])
    if command not in COMMANDS:
        raise FleetProtocolError(f"unknown command {command[:8]!r}")
    return command, list(frames[2:])


def read_payload(frames: Sequence[Any]) -> dict[str, Any]:
    """The msgpack map of a READY or HEARTBEAT (an absent one is empty)."""
    if not frames:
        return {}
    raw = _bytes(frames[0])
    if len(frames) != 1 or len(raw) > MAX_PAYLOAD_BYTES:
        raise FleetProtocolError(f"a payload is one msgpack map of at most {MAX_PAYLOAD_BYTES} bytes")
    try:
        data = msgpack.unpackb(raw, raw=False, strict_map_key=True, max_bin_len=0, max_ext_len=0)
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise FleetProtocolError(f"payload is not valid msgpack: {e}") from None
    if not isinstance(data, dict):
        raise FleetProtocolError("payload must be a msgpack map")
    return data


def request_frames(envelope: Envelope, body: Sequence[Any]) -> list[Any]:
    """REQUEST: tag, command, seq (8 bytes, big-endian), identity, flags (1 byte), user (UTF-8,
    empty = none), principal (UTF-8, empty = the identity), then the robot's frames."""
    flags = bytes([INTERNAL if envelope.internal else 0])
    user, principal = (envelope.user or "").encode(), envelope.principal.encode()
    return message(REQUEST, _SEQ.pack(envelope.seq), envelope.identity, flags, user, principal, *body)


def read_request(frames: Sequence[Any]) -> tuple[Envelope, list[Any]]:
    """(envelope, the robot's frames) of a REQUEST's frames after the command."""
    if len(frames) < 6:
        raise FleetProtocolError("a REQUEST has seq, identity, flags, user, principal and at least one frame")
    seq = read_seq(frames[0])
    identity, flags, user, principal = (_bytes(f) for f in frames[1:5])
    if not 0 < len(identity) <= 255 or len(flags) != 1 or len(user) > MAX_USER_BYTES or len(principal) > MAX_USER_BYTES:
        raise FleetProtocolError("a REQUEST envelope has a bad identity, flags, user or principal")
    try:
        name, who = (user.decode() if user else None), principal.decode()
    except UnicodeDecodeError:
        raise FleetProtocolError("a REQUEST's user or principal is not UTF-8") from None
    # An empty principal is the robot's identity (a gateway's connection), as `principal_of` names it.
    return Envelope(seq, identity, bool(flags[0] & INTERNAL), name, who or f"@{identity.hex()}"), list(frames[5:])


def reply_frames(seq: int, reply: Sequence[Any]) -> list[Any]:
    """REPLY: tag, command, seq, then the robot's reply frames."""
    return message(REPLY, _SEQ.pack(seq), *reply)


def read_seq(frame: Any) -> int:
    raw = _bytes(frame)
    if len(raw) != _SEQ.size:
        raise FleetProtocolError(f"seq must be {_SEQ.size} bytes")
    return _SEQ.unpack(raw)[0]


def read_status(status: dict[str, Any]) -> dict[str, Any]:
    """What a worker's HEARTBEAT says of its load (the figures `ping` adds up), checked: counts are
    integers >= 0, health a bool. Raises `FleetProtocolError`."""
    out: dict[str, Any] = {}
    for key in ("sessions", "refreshing", "in_flight"):
        value = status.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**31:
            raise FleetProtocolError(f"HEARTBEAT's {key} must be an integer >= 0")
        out[key] = value
    healthy = status.get("healthy", True)
    if not isinstance(healthy, bool):
        raise FleetProtocolError("HEARTBEAT's healthy must be a bool")
    out["healthy"] = healthy
    return out
