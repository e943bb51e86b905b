"""The XPUB under CURVE (`transport.subscriptions.SubscriptionBook` with `own_prefix`) on real
sockets: a subscriber may hold its own user's topics only, and a refused subscriber leaving never
lowers the subscriber count of a topic someone holds (the server ends a refreshing robot's session
when its topic has no subscriber left)."""

from __future__ import annotations

import time
from collections.abc import Callable

import zmq

from tests.support.keys import make_keys
from transport.curve import (
    apply_client,
    apply_server,
    load_server_keys,
    session_key,
    start_authenticator,
)
from transport.subscriptions import SUBSCRIBERS_DOMAIN, SubscriptionBook, configure_xpub
from transport.zmq_server import Publisher

MUST_COME_S = 20.0  # a bound on waiting for what must happen; reaching it is the failure detected


def test_refused_subscriptions_count_for_nothing(tmp_path):
    keys = make_keys(tmp_path)
    ctx = zmq.Context()
    auth = start_authenticator(ctx, load_server_keys(keys.server_secret, keys.clients), SUBSCRIBERS_DOMAIN)
    xpub = ctx.socket(zmq.XPUB)
    xpub.setsockopt(zmq.LINGER, 0)
    configure_xpub(xpub)
    xpub.bind(f"ipc://{tmp_path}/pub")  # bound before CURVE is set: plain, as the gateways' endpoint
    apply_server(xpub, load_server_keys(keys.server_secret, keys.clients))
    port = xpub.bind_to_random_port("tcp://127.0.0.1")
    gate = SubscriptionBook(xpub, own_prefix=True)
    publisher = Publisher(xpub, 16, gate)
    a, b = keys.client("robot-a"), keys.client("robot-b")
    a_topic, b_topic = session_key(a.user, "arm"), session_key(b.user, "arm")

    def pump_until(done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + MUST_COME_S
        while not done():
            assert time.monotonic() < deadline, f"still waiting; counts {publisher.subscriptions()}"
            if xpub.poll(50):
                publisher.on_subscription(xpub.recv_multipart(copy=False))

    def sub(client_keys, endpoint: str, *topics: bytes) -> zmq.Socket:
        s = ctx.socket(zmq.SUB)
        s.setsockopt(zmq.LINGER, 0)
        if client_keys is not None:
            apply_client(s, client_keys)
        for topic in topics:
            s.setsockopt(zmq.SUBSCRIBE, topic)
        s.connect(endpoint)
        return s

    try:
        tcp = f"tcp://127.0.0.1:{port}"
        a_sub = sub(a, tcp, a_topic.encode())
        pump_until(lambda: publisher.subscribers(a_topic) == 1)
        # b asks for a's topic and for everything, then for its own topic.
        b_sub = sub(b, tcp, a_topic.encode(), b"", b_topic.encode())
        pump_until(lambda: publisher.subscribers(b_topic) == 1 and gate.refused == 2)
        assert publisher.subscriptions() == {a_topic.encode(): 1, b_topic.encode(): 1}
        # b leaves: libzmq reports all three of its subscriptions gone, with no User-Id.
        b_sub.close()
        pump_until(lambda: publisher.subscribers(b_topic) == 0 and gate.held_written_off == 0)
        assert publisher.subscribers(a_topic) == 1, "a refused subscriber's leaving lowered a's count"
        # A plain local subscriber (a gateway) may subscribe to anything.
        internal = sub(None, f"ipc://{tmp_path}/pub", b"@json/1")
        pump_until(lambda: publisher.subscribers("@json/1") == 1)
        internal.close()
        a_sub.close()
        pump_until(lambda: publisher.subscribers(a_topic) == 0 and publisher.subscribers("@json/1") == 0)
    finally:
        auth.stop()
        ctx.destroy(linger=0)  # every socket, those a failed assertion left open too
