"""Typed errors, mapped to the wire once: `{"code": ..., "message": ...}`."""

from __future__ import annotations


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
