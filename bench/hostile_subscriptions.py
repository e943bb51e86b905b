"""What subscription attacks cost a live server and a live fleet front host, against the same figures
measured just before each attack in the same run.

Each server runs as deployed (`python -m runtime.policy_server --fixed-reply`, and with `--workers 2`
a front host with its broker and two workers), in a process of its own. The attacker is
`tests.zmtp.RawPeer` (ZMTP without libzmq, so it can send a subscription of any size); a second
loopback address, 127.0.0.2, stands for another host. A robot sets a refresh interval of 0.1 s and
listens (a pyzmq SUB), and pings the server; its refreshes in a window and the pings' median are
compared with the same window before the attack. The attacks are those of issue 19: a 4 MB
subscription, twenty of 1 MB, 200,000 subscribe/unsubscribe pairs of the empty topic (from another
host, and from the robot's own host, which then loses its connections with the attacker's and
connects again), and a flood of messages that are not subscriptions.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import threading
import time

import msgpack
import zmq

from bench.report import write_section
from tests.support.raw_dealer import RawDealer, image
from tests.support.server_process import ServerProcess
from tests.support.zmtp import RawPeer

INTERVAL_S = 0.1
OTHER_HOST = "127.0.0.2"


class _Robot:
    """A robot with a refresh interval, its listener and a pinger."""

    def __init__(self, server: ServerProcess, name: str):
        self.name = name.encode()
        self.dealer, self.pinger = RawDealer(server.router), RawDealer(server.router)
        self.sub = zmq.Context.instance().socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, self.name)
        self.sub.connect(server.pub)
        self.seqs: set[int] = set()
        header = {
            "type": "refresh",
            "id": 1,
            "robot": name,
            "options": {"subtask_refresh_interval": INTERVAL_S, "high_level_prompt": "tidy up"},
        }
        assert self.dealer.request(header, {"image/base_0_rgb": image()})["type"] == "refresh_ack"
        self.window(1.0)

    def window(self, seconds: float) -> tuple[int, float]:
        """(distinct refreshes received, ping median ms) over the next `seconds` (what arrived before
        it is read first and not counted)."""
        self._receive(0)
        pings, before, end = [], len(self.seqs), time.monotonic() + seconds
        while time.monotonic() < end:
            start = time.perf_counter()
            self.pinger.request({"type": "ping", "id": 2})
            pings.append((time.perf_counter() - start) * 1e3)
            self._receive(20)
        return len(self.seqs) - before, statistics.median(pings)

    def _receive(self, wait_ms: int) -> None:
        while self.sub.poll(wait_ms):
            topic, body = self.sub.recv_multipart()
            if topic == self.name:
                self.seqs.add(msgpack.unpackb(body)["seq"])

    def close(self) -> None:
        self.sub.close(linger=0)
        self.dealer.close()
        self.pinger.close()


def _flood(peer: RawPeer, data: bytes) -> threading.Thread:
    sender = threading.Thread(target=peer.send_raw, args=(data,), daemon=True)
    sender.start()
    return sender


def run(window_s: float) -> list[str]:
    rows = []
    pairs = b"".join(RawPeer.subscription(b"", s) for _ in range(200_000) for s in (True, False))
    upstream = RawPeer.message(b"\x07upstream") * 500_000
    for kind, flags in (("server", ("--fixed-reply",)), ("fleet front", ("--fixed-reply", "--workers", "2"))):
        with ServerProcess(*flags, gateways=False) as server:
            robot = _Robot(server, "bench-robot")
            attacks = [
                ("one 4 MB subscription", lambda s: RawPeer(s.pub).subscribe(b"x" * (4 << 20))),
                ("20 subscriptions of 1 MB", lambda s: [RawPeer(s.pub).subscribe(b"y" * (1 << 20)) for _ in range(20)]),
                ("200,000 subscribe/unsubscribe pairs from another host",
                 lambda s: _flood(RawPeer(s.pub, source=OTHER_HOST), pairs)),
                ("200,000 subscribe/unsubscribe pairs from the robot's own host",
                 lambda s: _flood(RawPeer(s.pub), pairs)),
                ("500,000 messages that are not subscriptions, from another host",
                 lambda s: _flood(RawPeer(s.pub, source=OTHER_HOST), upstream)),
            ]  # fmt: skip
            for name, attack in attacks:
                refreshes0, ping0 = robot.window(window_s)
                rss0 = server.rss_mb()["server"]
                attack(server)
                refreshes1, ping1 = robot.window(window_s)
                time.sleep(2.0)  # memory freed by what was dropped goes back a second after
                rss1 = server.rss_mb()["server"]
                rows.append(
                    f"| {kind} | {name} | {refreshes0} -> {refreshes1} | {ping0:.2f} -> {ping1:.2f} "
                    f"| {rss0:.0f} -> {rss1:.0f} | {'yes' if server.alive() else 'NO'} |"
                )
            robot.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=float, default=3.0, help="seconds measured before and during each attack")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows = run(args.window)
    body = (
        f"A robot refreshing every {INTERVAL_S:g} s listens and pings; each row compares a {args.window:g} s "
        "window just before the attack (the baseline) with the window that starts with it. Memory is the "
        "attacked process's resident size before the attack and 2 s after the window. Issue 19 asked for "
        "refreshes and ping median within 2x of before, and no memory kept; before its fixes a 4 MB "
        "subscription killed the front host, 20 of 1 MB took a server from 390 to 1522 MB, and the pairs "
        "sent the robot 183,626 duplicates and took ping's median from 1.6 to 138 ms.\n\n"
        "| process | attack | refreshes in the window | ping median ms | RSS MB | alive |\n"
        "|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    print(
        write_section(
            "hostile_subscriptions",
            "Subscription attacks on a live server and fleet front",
            body,
            f"python -m bench.hostile_subscriptions --window {args.window:g}",
            packages=("pyzmq",),
        )
    )


if __name__ == "__main__":
    main()
