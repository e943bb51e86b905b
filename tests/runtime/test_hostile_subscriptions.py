"""Subscriptions as an attacker sends them (issue 19), at a live single server and a live fleet front.

The server runs in its own process (`--fixed-reply`, and for the fleet `--workers 2`), so a crash shows
as a dead process; the attacker is `tests.zmtp.RawPeer`, a ZMTP peer without libzmq, which can send a
subscription of any size without its own libzmq walking it. A second loopback address (127.0.0.2, the
source of the attacker's connection; the servers listen on 127.0.0.1 only) stands for another host.

Timing: refresh counts and ping latencies under attack are compared with the same figures measured
just before, in the same test, never with fixed budgets.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import threading
import time
from collections.abc import Iterator

import msgpack
import pytest
import websockets.sync.client as ws_client
import zmq
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.support.raw_dealer import RawDealer, image
from tests.support.server_process import ServerProcess
from tests.support.zmtp import RawPeer

OTHER_HOST = "127.0.0.2"
MUST_COME_S = 20.0  # a bound on waiting for what must happen; reaching it is the failure detected
INTERVAL_S = 0.1  # the listening robot's refresh interval


@pytest.fixture(scope="module", params=["server", "fleet"])
def server(request) -> Iterator[ServerProcess]:
    flags = ("--fixed-reply",) if request.param == "server" else ("--fixed-reply", "--workers", "2")
    with ServerProcess(*flags, gateways=request.param == "server") as s:
        yield s


def _ping_ms(dealer: RawDealer, request_id: int) -> float:
    start = time.perf_counter()
    reply = dealer.request({"type": "ping", "id": request_id})
    assert reply["type"] == "pong", reply
    return (time.perf_counter() - start) * 1e3


def _assert_serving(server: ServerProcess, what: str) -> None:
    assert server.alive(), f"the server died after {what}:\n{server.log[-4000:]}"
    with RawDealer(server.router) as dealer:
        _ping_ms(dealer, 1)


def _grown_mb(server: ServerProcess, before: float, bound: float) -> float:
    """The server's memory growth since `before`, once it is under `bound` or `MUST_COME_S` has passed:
    freed pages go back to the system a second after the last departure (`transport.heap`), so a
    reading taken at once sees the peak, not what the server keeps."""
    deadline = time.monotonic() + MUST_COME_S
    while (grown := server.rss_mb()["server"] - before) >= bound and time.monotonic() < deadline:
        time.sleep(0.2)
    return grown


def _set_refresh(dealer: RawDealer, robot: str, interval: float | None = INTERVAL_S) -> None:
    header = {
        "type": "refresh",
        "id": 1,
        "robot": robot,
        "options": {"subtask_refresh_interval": interval, "high_level_prompt": "tidy up"},
    }
    ack = dealer.request(header, {"image/base_0_rgb": image()})
    assert ack["type"] == "refresh_ack", ack


class Listener:
    """A robot's refresh subscriber (pyzmq SUB, as `RefreshListener` uses) counting distinct refreshes."""

    def __init__(self, server: ServerProcess, robot: str):
        self.robot = robot.encode()
        self.seqs: set[int] = set()
        self._sub = zmq.Context.instance().socket(zmq.SUB)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.SUBSCRIBE, self.robot)
        self._sub.connect(server.pub)

    def drain(self, seconds: float) -> int:
        """Distinct refreshes of its robot received in the next `seconds`."""
        before = len(self.seqs)
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if self._sub.poll(int(left * 1e3) + 1):
                topic, body = self._sub.recv_multipart()
                if topic == self.robot:
                    self.seqs.add(msgpack.unpackb(body)["seq"])
        return len(self.seqs) - before

    def close(self) -> None:
        self._sub.close(linger=0)


@contextlib.contextmanager
def refreshing_robot(server: ServerProcess, robot: str) -> Iterator[tuple[RawDealer, Listener]]:
    """A robot with a refresh interval and a listener that has seen its first refresh."""
    dealer, listener = RawDealer(server.router), Listener(server, robot)
    try:
        _set_refresh(dealer, robot)
        deadline = time.monotonic() + MUST_COME_S
        while not listener.seqs:
            assert time.monotonic() < deadline, "no refresh reached the listener"
            listener.drain(0.2)
        yield dealer, listener
    finally:
        with contextlib.suppress(AssertionError):
            dealer.request({"type": "bye", "id": 9, "robot": robot})
        listener.close()
        dealer.close()


# ============================================================================ size


def test_a_huge_subscription_and_its_end_leave_the_server_serving(server):
    """libzmq's subscription trie recurses once per byte where it is forwarded (the fleet front's
    XSUB): a 256 KB topic used to kill the whole front host. Now a subscription longer than any topic
    closes its own connection inside libzmq, before any trie."""
    for size in (4 << 20, 256 << 10, 2000):
        with RawPeer(server.pub) as peer:
            peer.subscribe(b"x" * size)
            assert peer.closed_by_peer(MUST_COME_S), f"a {size}-byte subscription was kept"
        _assert_serving(server, f"a subscription of {size} bytes")
    # The longest real topic (a 256-character robot id) is a subscription like any other.
    with RawPeer(server.pub) as peer:
        peer.subscribe("é".encode() * 256)
        peer.unsubscribe("é".encode() * 256)
        assert not peer.closed_by_peer(0.5)
    _assert_serving(server, "the longest topic")


def test_twenty_one_megabyte_subscriptions_cost_no_memory(server):
    """20 subscriptions of 1 MB took a server from 390 to 1522 MB, and kept it."""
    before = server.rss_mb()["server"]
    for _ in range(20):
        with RawPeer(server.pub) as peer:
            peer.subscribe(b"y" * (1 << 20))
            assert peer.closed_by_peer(MUST_COME_S)
    _assert_serving(server, "20 subscriptions of 1 MB")
    grown = _grown_mb(server, before, 50)
    assert grown < 50, f"20 subscriptions of 1 MB raised the server's memory by {grown:.0f} MB"


_subscription_messages = st.lists(
    st.one_of(
        st.builds(RawPeer.subscription, st.binary(max_size=64), st.booleans()),
        st.builds(RawPeer.subscription, st.sampled_from([b"", b"@json/1-1", b"x" * 1064, b"x" * 1066]), st.booleans()),
        st.builds(lambda n, s: RawPeer.subscription(b"z" * n, s), st.integers(1000, 70_000), st.booleans()),
        st.builds(RawPeer.message, st.binary(max_size=300)),  # upstream messages, empty ones included
    ),
    min_size=1,
    max_size=40,
)
_RSS: dict[str, float] = {}


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    phases=(Phase.explicit, Phase.generate),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(messages=_subscription_messages, other_host=st.booleans())
def test_random_and_oversized_subscription_traffic_leaves_the_server_serving_with_flat_memory(
    server, messages, other_host
):
    """Random topics, oversized ones, messages that are not subscriptions, from one host or another,
    each batch on a connection of its own: the server (or front host) answers a ping after every
    batch, and its memory after all of them is where it was after the first."""
    with RawPeer(server.pub, source=OTHER_HOST if other_host else None) as peer:
        peer.send_raw(b"".join(messages))
        peer.closed_by_peer(0.05)  # oversized ones close it; let the server read the rest
    _assert_serving(server, "random subscription traffic")
    first = _RSS.setdefault(" ".join(server.argv), server.rss_mb()["server"])
    grown = _grown_mb(server, first, 30)
    assert grown < 30, f"random subscription traffic raised the server's memory by {grown:.0f} MB from {first:.0f} MB"


# ============================================================================ floods


@pytest.mark.parametrize("source", [OTHER_HOST, None], ids=["other-host", "same-host"])
def test_a_flood_of_subscription_changes_leaves_refreshes_and_pings_as_they_were(server, source):
    """200,000 subscribe/unsubscribe pairs of the empty topic: the robot's refreshes and a ping's
    median stay within 2x of what they were just before. (They once replayed every topic's last
    value to every subscriber each time: 183,626 duplicates in 15 s, ping 1.6 -> 138 ms.) From the
    robot's own host the flood also costs the robot's connection, which comes back by itself."""
    robot = f"flooded-{source or 'local'}"
    with refreshing_robot(server, robot) as (dealer, listener), RawDealer(server.router) as pinger:
        window_s = 2.0

        def measure() -> tuple[int, float]:
            pings, refreshes, end = [], 0, time.monotonic() + window_s
            while time.monotonic() < end:
                pings.append(_ping_ms(pinger, len(pings) + 10))
                refreshes += listener.drain(0.05)
                _set_refresh(dealer, robot)  # a control loop's requests go on meanwhile
            return refreshes, statistics.median(pings)

        refreshes_before, ping_before = measure()
        flood = b"".join(RawPeer.subscription(b"", subscribe) for _ in range(200_000) for subscribe in (True, False))
        peer = RawPeer(server.pub, source=source)
        sender = threading.Thread(target=peer.send_raw, args=(flood,), daemon=True)
        sender.start()
        refreshes_during, ping_during = measure()
        sender.join(MUST_COME_S)
        peer.close()
        assert refreshes_during >= refreshes_before / 2, (refreshes_before, refreshes_during)
        assert ping_during <= 2 * max(ping_before, 1.0), (ping_before, ping_during)
    _assert_serving(server, "a flood of subscription changes")


def test_distinct_topics_without_end_cost_the_flooding_host_its_connections(server):
    """libzmq records every subscription a connection sends, accepted or not, until it ends (about
    47 bytes of memory per byte). A host sending topic after topic loses its connections once it
    has sent 1 MiB of them; the server's memory stays bounded; its other robots are served."""
    before = server.rss_mb()["server"]
    with refreshing_robot(server, "bystander") as (_, listener):
        cut = 0
        for round_ in range(3):
            peer = RawPeer(server.pub, source=OTHER_HOST)
            batch = b"".join(RawPeer.subscription(b"%d/%d/" % (round_, i) + b"z" * 900) for i in range(4000))
            peer.send_raw(batch)
            cut += peer.closed_by_peer(MUST_COME_S)
            peer.close()
        assert cut == 3, "a host that sent 3.6 MB of distinct subscriptions kept its connection"
        assert listener.drain(1.0) >= 1, "the bystander's refreshes stopped"
    _assert_serving(server, "floods of distinct topics")
    grown = _grown_mb(server, before, 150)
    assert grown < 150, f"floods of distinct topics raised the server's memory by {grown:.0f} MB"
    assert "sent more than 1048576 bytes of subscriptions" in server.log


# ============================================================================ forged unsubscriptions


def test_a_forged_unsubscription_ends_no_ones_refreshes(server):
    """An unsubscription from a connection that never subscribed used to lower the topic's count:
    one 10-byte message ended a listening robot's session (it then expired after 2 s of silence).
    The robot here only listens, so its session lives by its subscriber alone."""
    with refreshing_robot(server, "victim") as (_, listener), RawPeer(server.pub, source=OTHER_HOST) as forger:
        for _ in range(5):
            forger.unsubscribe(b"victim")
        forger.subscribe(b"victim")  # and a subscription of its own, ended by its connection's end
        time.sleep(0.2)
        forger.close()
        # 3 intervals of silence (at least 2 s) end a session without a subscriber: wait past that.
        received = listener.drain(4.0)
        assert received >= 4.0 / INTERVAL_S / 4, (
            f"the victim's refreshes stopped after a forged unsubscription ({received})"
        )
        with RawDealer(server.router) as dealer:
            assert dealer.request({"type": "ping", "id": 2})["data"]["server"]["refreshing"] >= 1


@pytest.mark.parametrize("spent", ["bytes", "messages"])
def test_what_a_cut_host_subscribed_cannot_end_another_robots_session(server, spent):
    """Another host spends its budget (of bytes: to within a few bytes, then the victim's topic; of
    messages: past its burst, then the victim's topic, which arrives after the cut from a connection
    already closed). libzmq records those subscriptions and reports them gone when the connection
    ends; they used to lower the victim's count (neither counted nor written off), ending the session
    of a robot that still listened."""
    robot = f"target-{spent}"
    with refreshing_robot(server, robot) as (_, listener):
        if spent == "bytes":
            budget = 1 << 20
            junk = [RawPeer.subscription(b"t%04d" % i + b"." * 995) for i in range(budget // (1000 + 64))]
            filler = b"u" * (budget - len(junk) * (1000 + 64) - 64 - 4)  # within a few bytes of the budget
            flood = b"".join(junk) + RawPeer.subscription(filler)
        else:
            flood = b"".join(RawPeer.subscription(b"m%05d" % i) for i in range(3000))
        with RawPeer(server.pub, source=OTHER_HOST) as attacker:
            attacker.send_raw(flood + RawPeer.subscription(robot.encode()))
            assert attacker.closed_by_peer(MUST_COME_S), "the attacker's connection was not closed"
        # 3 intervals of silence (at least 2 s) end a session without a subscriber: wait past that.
        received = listener.drain(4.0)
        assert received >= 4.0 / INTERVAL_S / 4, f"the robot's refreshes stopped after another host's cut: {received}"


def test_upstream_messages_cost_their_sender_like_subscriptions(server):
    """An XPUB's subscribers have nothing to say but subscriptions, yet libzmq queues whatever they send
    for the server without bound: messages that are not subscriptions used to cost nothing and were
    never cut (4 such senders took a server from 44 to 2063 MB in 20 s)."""
    before = server.rss_mb()["server"]
    with refreshing_robot(server, "quiet") as (_, listener):
        with RawPeer(server.pub, source=OTHER_HOST) as attacker:
            attacker.send_raw(RawPeer.message(b"\x07upstream") * 50_000)
            assert attacker.closed_by_peer(MUST_COME_S), "a flood of upstream messages was not cut"
        assert listener.drain(1.0) >= 1
    grown = _grown_mb(server, before, 50)
    assert grown < 50, f"upstream messages raised the server's memory by {grown:.0f} MB"


def test_subscribers_that_come_and_go_never_spend_their_hosts_budget():
    """A departing subscriber's subscription gives its bytes back: a host whose robots reconnect
    thousands of times (or a gateway whose WebSocket clients do) was cut once their departures had
    added up to 1 MiB, writing off its live subscriptions. Here the budget is small and a SUB connects,
    subscribes and leaves far more often than it holds."""
    from transport.connections import Connections
    from transport.subscriptions import SubscriptionBook, SubscriptionLimits, configure_xpub
    from transport.zap import ZapHandler

    ctx = zmq.Context()
    zap = ZapHandler(ctx)
    zap.start()
    xpub = ctx.socket(zmq.XPUB)
    configure_xpub(xpub)
    connections = Connections(xpub)
    port = xpub.bind_to_random_port("tcp://127.0.0.1")
    book = SubscriptionBook(xpub, SubscriptionLimits(bytes_per_address=20 * (64 + 10)), cut=connections.cut)

    def pump_until(done) -> None:
        deadline = time.monotonic() + MUST_COME_S
        while not done():
            assert time.monotonic() < deadline, f"still waiting; counts {book.subscriptions()}"
            while connections.monitor.poll(0):
                connections.on_event(connections.monitor.recv_multipart(copy=False))
            if xpub.poll(20):
                book.handle(xpub.recv(copy=False))

    try:
        stays = ctx.socket(zmq.SUB)
        stays.setsockopt(zmq.SUBSCRIBE, b"stays")
        stays.connect(f"tcp://127.0.0.1:{port}")
        pump_until(lambda: book.subscribers(b"stays") == 1)
        for i in range(60):  # 3x the budget, one subscription at a time
            sub = ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.LINGER, 0)
            sub.setsockopt(zmq.SUBSCRIBE, b"robot-%03d" % i)
            sub.connect(f"tcp://127.0.0.1:{port}")
            pump_until(lambda i=i: book.subscribers(b"robot-%03d" % i) == 1)
            sub.close()
            pump_until(lambda i=i: book.subscribers(b"robot-%03d" % i) == 0)
        assert book.cuts == 0 and book.subscribers(b"stays") == 1
        stays.close()
    finally:
        connections.close()
        xpub.close(linger=0)
        zap.stop()
        ctx.destroy(linger=0)


def test_a_forged_unsubscription_ends_no_websocket_clients_refreshes(server):
    """A WebSocket client's session is `@json/<pid>-<n>`, which an attacker can enumerate; its
    subscription is the gateway's, over ipc: an unsubscription from a TCP peer cannot end it."""
    if not server.ports[2]:
        pytest.skip("this server runs no gateways")
    request = {
        "high_level_prompt": "tidy up",
        "images": {"base_0_rgb": image(8, 8).tolist()},
        "subtask_refresh_interval": INTERVAL_S,
    }
    with ws_client.connect(server.ws, max_size=None, open_timeout=10) as connection:
        connection.send(json.dumps(request))
        assert json.loads(connection.recv(timeout=MUST_COME_S))["status"] == "success"
        gateways = [pid for pid in server.children()]
        with RawPeer(server.pub, source=OTHER_HOST) as forger:
            for pid in gateways:
                for n in range(1, 20):
                    forger.unsubscribe(f"@json/{pid}-{n}".encode())
        pushes, deadline = 0, time.monotonic() + 4.0
        while (left := deadline - time.monotonic()) > 0:
            with contextlib.suppress(TimeoutError):
                message = json.loads(connection.recv(timeout=left))
                pushes += message.get("type") == "subtask_refresh"
        assert pushes >= 4.0 / INTERVAL_S / 4, f"the WebSocket client's refreshes stopped ({pushes})"
