"""Free TCP ports on 127.0.0.1, for the tests and benchmarks that start servers on real sockets."""

from __future__ import annotations

import socket


def free_local_ports(n: int) -> list[int]:
    """n TCP ports free on 127.0.0.1 right now (each bound once by the kernel's choice, then let go)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports
