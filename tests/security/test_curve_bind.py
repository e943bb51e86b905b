"""`transport.curve.bind`, how the single server's and the broker's sockets take their endpoints: the
tcp ones are CURVE servers, the local ones stay plain, whatever order they come in."""

from __future__ import annotations

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from tests.support.keys import make_keys
from transport import curve

OUTCOMES = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH


def _handshake(ctx: zmq.Context, endpoint: str, keys: curve.ClientKeys | None) -> int:
    """How a DEALER's handshake with `endpoint` ends: the monitor event (a zmq.EVENT_HANDSHAKE_*)."""
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        curve.apply_client(dealer, keys)
    monitor = dealer.get_monitor_socket(OUTCOMES)
    try:
        dealer.connect(endpoint)
        assert monitor.poll(10_000), "no handshake outcome"
        return recv_monitor_message(monitor)["event"]
    finally:
        dealer.disable_monitor()
        monitor.close(linger=0)
        dealer.close(linger=0)


@pytest.mark.parametrize("tcp_first", [True, False])
def test_tcp_endpoints_take_curve_and_local_ones_stay_plain(tmp_path, tcp_first):
    keys = make_keys(tmp_path)
    server_keys = curve.load_server_keys(keys.server_secret, keys.clients)
    ctx = zmq.Context()
    auth = curve.start_authenticator(ctx, server_keys)
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    try:
        local = f"ipc://{tmp_path}/router"
        wanted = ["tcp://127.0.0.1:*", local] if tcp_first else [local, "tcp://127.0.0.1:*"]
        bound = curve.bind(router, wanted, server_keys)
        tcp = bound[0] if tcp_first else bound[1]
        assert bound[1 if tcp_first else 0] == local and tcp.startswith("tcp://127.0.0.1:") and "*" not in tcp
        assert _handshake(ctx, local, None) == zmq.EVENT_HANDSHAKE_SUCCEEDED
        assert _handshake(ctx, tcp, None) == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
        assert _handshake(ctx, tcp, keys.client("robot-a")) == zmq.EVENT_HANDSHAKE_SUCCEEDED
    finally:
        router.close(linger=0)
        auth.stop()
        ctx.term()
