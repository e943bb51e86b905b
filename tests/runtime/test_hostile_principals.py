"""What one client may hold and how health answers under load (issue 19), at live servers in their own
processes (`--fixed-reply`, which checks requests as the engine does).

A client's bounds count its principal (its CURVE key, else its address), not the DEALER identities and
robot names it chooses; past them the oldest of its own sessions ends, so the table cannot be locked.
Health checks are exempt from the request caps. Log lines cannot be forged through a robot id.
"""

from __future__ import annotations

import time
import urllib.request

import pytest
import zmq

from tests.support.raw_dealer import RawDealer, image, ping
from tests.support.server_process import ServerProcess
from transport import codec

OBS = {"image/base_0_rgb": image(8, 8)}
MUST_COME_S = 30.0  # a bound on waiting for what must happen; reaching it is the failure detected


def _refresh(request_id: int, robot: str, interval: float | None = 3600.0) -> list:
    header = {
        "type": "refresh",
        "id": request_id,
        "robot": robot,
        "options": {"subtask_refresh_interval": interval, "high_level_prompt": "tidy up"},
    }
    return codec.encode(header, OBS)


def _collect(dealers: list[RawDealer], n: int) -> list[dict]:
    """`n` replies, from whichever dealers they come."""
    poller = zmq.Poller()
    for d in dealers:
        poller.register(d.socket, zmq.POLLIN)
    replies, deadline = [], time.monotonic() + MUST_COME_S
    while len(replies) < n:
        assert time.monotonic() < deadline, f"{len(replies)} of {n} replies came"
        for sock, _ in poller.poll(1000):
            replies.append(codec.decode(sock.recv_multipart())[0])
    return replies


def _healthz(url: str) -> int:
    try:
        with urllib.request.urlopen(url.replace("ws://", "http://") + "/healthz", timeout=MUST_COME_S) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _from(host: str, endpoint: str) -> str:
    """`endpoint` reached from the source address `host` (another host, as the server sees it)."""
    return f"tcp://{host}:0;" + endpoint.removeprefix("tcp://")


def test_health_says_200_while_500_clients_flood_the_router():
    """`ping` counted against the 256 in-flight cap, so `/healthz` said 503 under load (500 DEALERs
    with one request each). Two hosts here fill the cap (128 requests in flight each, the rest
    `busy`); a ping is exempt: the ROUTER answers it and both WebSocket ports say 200."""
    with ServerProcess("--fixed-reply", "--fixed-reply-delay", "30") as server:
        ctx = zmq.Context()
        try:
            flood = [RawDealer(_from(f"127.0.0.{1 + i % 2}", server.router), ctx) for i in range(500)]
            for i, dealer in enumerate(flood):
                header = {"type": "infer", "id": i, "robot": f"r{i % 64}", "options": {"high_level_prompt": "go"}}
                dealer.send(codec.encode(header, OBS))
            busy = _collect(flood, 500 - 256)  # answered at once; 256 stay in flight for 30 s
            assert {r["error"]["code"] for r in busy} == {"busy"}, busy[:3]
            assert ping(server.router)["healthy"] is True  # answered, not `busy`
            assert _healthz(server.ws) == 200
            assert _healthz(server.openpi) == 200
        finally:
            ctx.destroy(linger=0)


def test_under_the_session_table_attack_a_new_robot_is_served_at_once():
    """64 DEALER identities x 16 robot ids with a 3600 s refresh interval and a SUB on every topic used
    to fill all 1024 sessions, and new robots got `busy` for up to 600 s. Now the attacker's address
    holds at most its share; a new robot, from that address or another, is served."""
    with ServerProcess("--fixed-reply", gateways=False) as server:
        ctx = zmq.Context()
        try:
            with RawDealer(server.router, ctx) as probe:
                start = time.perf_counter()
                assert probe.exchange(_refresh(1, "baseline")) is not None
                baseline_s = time.perf_counter() - start
                probe.exchange(codec.encode({"type": "bye", "id": 2, "robot": "baseline"}))
            attackers = [RawDealer(server.router, ctx) for _ in range(64)]
            subs = ctx.socket(zmq.SUB)
            subs.connect(server.pub)
            for a, dealer in enumerate(attackers):
                for r in range(16):
                    subs.setsockopt(zmq.SUBSCRIBE, f"a{a}-{r}".encode())
                    dealer.send(_refresh(r, f"a{a}-{r}"))
            replies = _collect(attackers, 64 * 16)
            assert all(r["type"] == "refresh_ack" for r in replies), [r for r in replies if r["type"] != "refresh_ack"][
                :3
            ]
            assert ping(server.router)["sessions"] == 64  # the attacker's address holds its share
            for endpoint in (server.router, _from("127.0.0.2", server.router)):
                with RawDealer(endpoint, ctx) as newcomer:
                    start = time.perf_counter()
                    reply = codec.decode(newcomer.exchange(_refresh(1, "newcomer", None)))[0]
                    took_s = time.perf_counter() - start
                assert reply["type"] == "refresh_ack", reply
                assert took_s < max(1.0, 50 * baseline_s), (took_s, baseline_s)
            subs.close(linger=0)
        finally:
            ctx.destroy(linger=0)


FORGED = "2026-12-07 00:00:00,000 ERROR runtime.policy_server.main: forged"


@pytest.mark.parametrize("robot", ["evil\n" + FORGED, "\x1b[2J\x1b[31mred"], ids=["newline", "escape"])
def test_a_robot_id_cannot_forge_or_color_a_log_line(robot):
    """A robot id with a newline wrote a log line of the attacker's choosing; escape codes reached the
    operator's terminal raw. Its session's end (here: evicted at the address's cap of 1) is logged
    with the id quoted, and no line holds a control character."""
    with ServerProcess("--fixed-reply", "--max-sessions-per-peer", "1", gateways=False) as server:
        with RawDealer(server.router) as dealer:
            for i, name in enumerate((robot, "next")):
                reply = codec.decode(dealer.exchange(_refresh(i, name, None)))[0]
                assert reply["type"] == "refresh_ack", reply
        assert server.wait_for(lambda line: "to make room for a new robot" in line, MUST_COME_S)
    assert repr(robot) in server.log  # quoted where it is logged
    lines = server.log.splitlines()
    assert not any(line.startswith(FORGED) for line in lines)
    assert not any("\x1b" in line for line in lines)
