"""What a request must pass at the wire edge before anything serves it, and the count of what is in flight.

The single server (`transport.zmq_server`) and the fleet broker (`runtime.fleet.broker`) both admit
robots' requests through an `Admission`, so a robot meets the same bounds and the same typed errors
(`oversize`, `bad_message`, `busy`, ...) whichever of them it talks to. The checks run cheapest
first: the size, then decoding (the header is small and bounded), then the in-flight caps in all, per
peer identity (a gateway's peer, one WebSocket connection, holds a JSON batch: a cap of its own) and
per principal. A `ping` is exempt from the caps, so a health check answers under load.

Admitting does not count a request: the server counts it when it starts serving it, the broker once
a worker took it (`take`), and each counts it off with its reply (`settle`).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from transport import codec
from transport.errors import ProtocolError, TransportError
from transport.messages import ERROR, PING, Request, build_request

log = logging.getLogger(__name__)

# Told of every message the server or the broker answered: whether it came in on the internal
# ROUTER (the gateways'), its robot and request type ("" for a message refused before its header
# was read), the outcome ("ok" or the error code) and the seconds from receipt to the reply. It is
# told just before the answer goes out, so a client holding its reply finds it counted. Metrics hang
# on it; nothing is told when no observer is set.
Observer = Callable[[bool, str, str, str, float], None]


@dataclasses.dataclass(frozen=True)
class AdmissionLimits:
    max_message_bytes: int = 32 * 1024 * 1024
    max_in_flight: int = 256
    max_in_flight_per_peer: int = 16
    max_in_flight_per_principal: int = 128  # a host's (or a key's) robots together
    # A gateway peer is one WebSocket connection; a JSON batch holds up to this many requests.
    max_in_flight_per_internal_peer: int = 64


class Admission:
    """The limits, and the requests in flight per peer (internal?, identity), per principal and in all."""

    def __init__(self, limits: AdmissionLimits):
        self.limits = limits
        self._per_peer: collections.Counter[tuple[bool, bytes]] = collections.Counter()
        self._per_principal: collections.Counter[str] = collections.Counter()
        self.in_flight = 0

    def admit(self, body: list, identity: bytes, internal: bool, principal: str) -> Request:
        """The request in `body` (its frames after the identity), or a `TransportError` to answer it
        with (`rejection`). An unexpected failure while decoding becomes an `internal` error: a
        decoder bug must not stop the server or the broker for every robot."""
        try:
            return self._admit(body, identity, internal, principal)
        except TransportError:
            raise
        except Exception as e:
            log.exception("unexpected failure decoding a message from %s", identity.hex())
            raise TransportError(f"internal error: {type(e).__name__}") from None

    def _admit(self, body: list, identity: bytes, internal: bool, principal: str) -> Request:
        limits = self.limits
        size = sum(map(len, body))
        if size > limits.max_message_bytes:
            raise ProtocolError(
                f"message is {size} bytes, more than the server's limit of {limits.max_message_bytes}", "oversize"
            )
        header, arrays = codec.decode(body)
        request = build_request(header, arrays, identity.hex(), internal)
        if request.type == PING:
            return request
        if self.in_flight >= limits.max_in_flight:
            raise TransportError("the server has too many requests in flight; retry later", "busy")
        per_peer = limits.max_in_flight_per_internal_peer if internal else limits.max_in_flight_per_peer
        if self._per_peer[(internal, identity)] >= per_peer:
            raise TransportError(f"this client has {per_peer} requests in flight, the limit", "busy")
        if not internal and self._per_principal[principal] >= limits.max_in_flight_per_principal:
            raise TransportError(
                f"this client's address (or key) has {limits.max_in_flight_per_principal} requests in flight, "
                "the limit",
                "busy",
            )
        return request

    def take(self, identity: bytes, internal: bool, principal: str) -> None:
        """Counts one admitted request in flight."""
        self._per_peer[(internal, identity)] += 1
        self._per_principal[principal] += 1
        self.in_flight += 1

    def settle(self, identity: bytes, internal: bool, principal: str) -> None:
        """Counts off one request `take` counted (it was answered, or will never be)."""
        for counts, key in ((self._per_peer, (internal, identity)), (self._per_principal, principal)):
            counts[key] -= 1
            if counts[key] <= 0:
                del counts[key]
        self.in_flight -= 1


def rejection(body: list, error: TransportError) -> dict[str, Any]:
    """The error reply to a message that was not admitted, with its id when the header has a valid one."""
    return {"type": ERROR, "id": codec.request_id(body), "error": error.to_wire()}
