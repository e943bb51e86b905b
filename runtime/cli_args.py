"""The command-line values that the policy server, the front host and the broker share: ports,
positive numbers, log levels, and where an endpoint is.

One module of its own so that each command imports these without importing another command (the
broker and the front host used to reach into `runtime.policy_server` for them, in a cycle).
"""

from __future__ import annotations

import argparse
import ipaddress
from collections.abc import Callable
from typing import Any

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def port(text: str) -> int:
    """A TCP port, 1..65535, or 0 for "this endpoint is off"."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port: use 1..65535, or 0 to turn the endpoint off")
    return value


def positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text} must be > 0")
        return value

    return parse


def loopback(host: str) -> bool:
    """Whether `host` is this machine only (a host name other than localhost may resolve to anything)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def tcp_endpoint(host: str, port: int) -> str:
    return f"tcp://{host}:{port}"
