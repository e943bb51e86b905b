"""Typed errors, mapped to the wire once: `{"code": ..., "message": ...}`."""

from __future__ import annotations

from typing import Any

_SHOWN_CHARS = 40

# Every code a server or broker answers (docs/protocol.md): a metric labelled by code stays bounded.
ERROR_CODES = frozenset(
    {
        "bad_message", "bad_header", "bad_version", "bad_frames", "bad_dtype", "unknown_type", "oversize",
        "bad_request", "busy", "timeout", "unavailable", "internal",
    }
)  # fmt: skip


class TransportError(Exception):
    """An error with a machine-readable code that travels to the peer."""

    code = "internal"

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def to_wire(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class ProtocolError(TransportError):
    """The message is malformed: frames, header, array descriptors or sizes."""

    code = "bad_message"


class BadRequest(TransportError):
    """The message is well-formed but its request cannot be served (the JSON API's `bad_request`)."""

    code = "bad_request"


class RemoteError(TransportError):
    """An error reply from the server, raised on the client side."""


class RequestTimeout(TransportError):
    """No reply within the timeout, after every retry."""

    code = "timeout"


def describe(value: Any) -> str:
    """A short, safe rendering of a value from the wire for an error message.

    `repr` is neither: a 60 KB string would travel back whole, a list nested a thousand deep raises
    `RecursionError`, and an integer of more than 4300 digits raises `ValueError`. Scalars are shown
    (strings cut, lone surrogates escaped by `repr`), containers only by their type.
    """
    if value is None or isinstance(value, bool | float):
        return repr(value)
    if isinstance(value, int):
        return repr(value) if value.bit_length() <= 64 else f"an integer of {value.bit_length()} bits"
    if isinstance(value, str):
        return repr(value) if len(value) <= _SHOWN_CHARS else f"{value[:_SHOWN_CHARS]!r}... ({len(value)} chars)"
    if isinstance(value, bytes):
        return f"{len(value)} bytes"
    if isinstance(value, dict):
        return "a map"
    if isinstance(value, list | tuple):
        return "a list"
    return f"a {type(value).__name__}"
