"""CURVE on the broker <-> worker link: the broker's back ROUTER and XSUB admit only workers whose key is
on their own allow-list (`--worker-curve-secret/--worker-curve-clients`), a worker joins with the
broker's public key and its pair (`--join-curve-server-key/--join-curve-key`), and a worker without an
allowed key is never sent a robot's request. Real processes on 127.0.0.1 with the fixed backend.

A refused connection is seen from the rogue's side, by its socket monitor's handshake failure, before
the robots start; every wait here only turns a hang into a failure (`CAP_S`).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from runtime.fleet import broker_main as broker_cli
from runtime.fleet.front import join_keys
from runtime.fleet.protocol import READY, message, payload
from runtime.keys import create_pair
from runtime.policy_server.flags import parse_args
from tests.support.eventually import eventually
from tests.support.keys import Keys, make_keys
from tests.support.ports import free_local_ports
from tests.support.server_process import ServerProcess, broker_process
from transport.curve import ClientKeys, CurveError, apply_client, load_client_keys, load_pair, load_public
from transport.zmq_client import PolicyClient

CAP_S = 60.0  # failure detection only
HEARTBEAT_S = 0.2
IMAGES = {"base_0_rgb": np.zeros((8, 8, 3), np.uint8)}
HANDSHAKE_FAILED = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
HANDSHAKE_FAILED |= zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL


class WorkerKeys:
    """The broker's worker-side pair, a `worker` pair on its allow-list and a `rogue` pair that is not."""

    def __init__(self, root: Path):
        root.mkdir()
        for name in ("broker", "worker", "rogue"):
            create_pair(root, name)
        (root / "allowed").mkdir()
        shutil.copy(root / "worker.key", root / "allowed")
        self.root = root

    def broker_flags(self) -> list[str]:
        secret, clients = self.root / "broker.key_secret", self.root / "allowed"
        return ["--worker-curve-secret", str(secret), "--worker-curve-clients", str(clients)]

    def join_flags(self, name: str) -> list[str]:
        server, key = self.root / "broker.key", self.root / f"{name}.key_secret"
        return ["--join-curve-server-key", str(server), "--join-curve-key", str(key)]

    def client(self, key_secret: Path) -> ClientKeys:
        """A pair from anywhere (a robot's, say) as a client of the broker's worker side."""
        return load_client_keys(self.root / "broker.key", key_secret)


def _worker(endpoint: str, name: str, *flags: str) -> ServerProcess:
    """`python -m runtime.policy_server --join ENDPOINT` with the fixed backend (not yet started)."""
    return ServerProcess("--join", endpoint, "--worker-name", name, "--fixed-reply", *flags, gateways=False)


class Rogue:
    """A raw socket that tries the workers' side with `keys` (None: no CURVE at all)."""

    def __init__(self, ctx: zmq.Context, kind: int, endpoint: str, keys: ClientKeys | None):
        self.sock = ctx.socket(kind)
        self.sock.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            apply_client(self.sock, keys)
        self.monitor = self.sock.get_monitor_socket(HANDSHAKE_FAILED | zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self.sock.connect(endpoint)

    def refused(self) -> bool:
        """Whether its first handshake failed (False: it succeeded, or nothing happened within `CAP_S`)."""
        if not self.monitor.poll(int(CAP_S * 1e3)):
            return False
        return bool(recv_monitor_message(self.monitor)["event"] & HANDSHAKE_FAILED)

    def received(self) -> list[list[bytes]]:
        out = []
        while self.sock.poll(0):
            out.append(self.sock.recv_multipart())
        return out

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close()
        self.sock.close()


def _workers(client: PolicyClient) -> dict[str, int]:
    return {w["name"]: w["robots"] for w in client.ping()["broker"]["workers"]}


def _refreshed(clients: list[PolicyClient], pub: str, at_least: int) -> dict[str, int]:
    """Sets a refresh for every client and returns the counts once each robot heard `at_least`."""
    heard: dict[str, int] = {}
    for c in clients:
        c.listen_refreshes(pub, lambda m: heard.__setitem__(m["robot"], heard.get(m["robot"], 0) + 1))
        c.set_refresh(0.2, IMAGES, "tidy up")

    def enough() -> bool:
        for c in clients:
            c.poll(0.01)
        return len(heard) == len(clients) and min(heard.values()) >= at_least

    assert eventually(enough), heard
    return heard


def test_a_worker_without_an_allowed_key_is_never_sent_a_robots_request(tmp_path):
    robots = make_keys(tmp_path / "robots")
    workers = WorkerKeys(tmp_path / "workers")
    ports = free_local_ports(4)
    back, xsub = (f"tcp://127.0.0.1:{p}" for p in ports[2:])
    broker = broker_process(ports, "--heartbeat", str(HEARTBEAT_S), *robots.server_flags(), *workers.broker_flags())
    assert broker.ready["endpoints"]["router"] == f"tcp://127.0.0.1:{ports[0]}"
    ctx = zmq.Context()
    rogues: list[Rogue] = []
    procs = [broker]
    try:
        # Rogues first: raw sockets with a key not on the list, a robot's key, no key, and a real worker
        # process with a key not on the list. Each is refused at the handshake.
        rogue_key, robot_key = workers.root / "rogue.key_secret", robots.root / "robot-a.key_secret"
        for keys in (workers.client(rogue_key), workers.client(robot_key), None):
            rogues.append(Rogue(ctx, zmq.DEALER, back, keys))
            rogues[-1].sock.send_multipart(message(READY, payload({"name": "rogue", "capacity": 1024})))
        rogues.append(Rogue(ctx, zmq.XPUB, xsub, workers.client(rogue_key)))
        assert all(rogue.refused() for rogue in rogues)
        rogue_worker = _worker(back, "rogue-worker", *workers.join_flags("rogue")).spawn()
        procs.append(rogue_worker)
        assert rogue_worker.wait_for(lambda line: "refused this worker's CURVE key" in line, CAP_S), rogue_worker.log

        good = _worker(back, "good", *workers.join_flags("worker")).spawn()
        procs.append(good)
        keys = robots.client("robot-a")
        clients = [PolicyClient(broker.router, f"arm{i}", keys=keys, timeout_s=10) for i in range(3)]
        try:
            assert eventually(lambda: _workers(clients[0]) == {"good": 0})
            for c in clients:
                for _ in range(2):
                    assert c.infer(IMAGES, "go")["actions"].shape[0] > 0
            assert _workers(clients[0]) == {"good": 3}
            # Refreshes cross the workers' CURVE XSUB; the subscriptions reach the good worker only.
            _refreshed(clients, broker.pub, at_least=2)
        finally:
            for c in clients:
                c.close()
        assert [rogue.received() for rogue in rogues] == [[], [], [], []]
        assert "joined the broker" not in rogue_worker.log
        assert "worker 'good' joined" in broker.log and "worker 'rogue" not in broker.log

        # The allow-lists are apart: the good worker's key is no robot's.
        worker_as_robot = load_client_keys(robots.root / "server.key", workers.root / "worker.key_secret")
        as_robot = Rogue(ctx, zmq.DEALER, broker.router, worker_as_robot)
        rogues.append(as_robot)
        assert as_robot.refused()
    finally:
        for rogue in rogues:
            rogue.close()
        ctx.term()
        for proc in reversed(procs):
            proc.stop()


def test_a_front_hosts_own_workers_stay_on_ipc_and_a_remote_worker_joins_with_its_key(tmp_path):
    """`--workers 1 --worker-port P` with worker CURVE: `cpu0` joins over plain ipc (the front host is
    ready only once it has), a remote worker over tcp with its key; both serve robots and refreshes
    (each through the XSUB of its own transport)."""
    workers = WorkerKeys(tmp_path / "workers")
    (port,) = free_local_ports(1)
    flags = ["--workers", "1", "--worker-port", str(port), *workers.broker_flags()]
    front = ServerProcess(*flags, "--fixed-reply", "--heartbeat", str(HEARTBEAT_S), gateways=False).start(CAP_S)
    remote = _worker(f"tcp://127.0.0.1:{port}", "remote", *workers.join_flags("worker")).spawn()
    ctx = zmq.Context()
    plain = Rogue(ctx, zmq.DEALER, f"tcp://127.0.0.1:{port}", None)
    clients = [PolicyClient(front.router, f"arm{i}", timeout_s=10) for i in range(2)]
    try:
        assert plain.refused()
        assert eventually(lambda: _workers(clients[0]) == {"cpu0": 0, "remote": 0})
        for c in clients:
            assert c.infer(IMAGES, "go")["actions"].shape[0] > 0
        assert _workers(clients[0]) == {"cpu0": 1, "remote": 1}
        _refreshed(clients, front.pub, at_least=2)
        assert plain.received() == []
    finally:
        for c in clients:
            c.close()
        plain.close()
        ctx.term()
        remote.stop()
        front.stop()


def _warnings(caplog, call: Callable[[], object]) -> list[str]:
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        call()
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_an_open_worker_side_is_warned_about_on_loopback_too(tmp_path, caplog):
    """A TCP worker endpoint without keys lets a process that reaches it join as a worker and read
    robots' requests: on loopback that is any process of the host, which the warning says."""
    workers = WorkerKeys(tmp_path / "workers")
    parser = broker_cli.build_parser()

    def broker(*argv: str) -> Callable[[], object]:
        return lambda: broker_cli.settings_from(parser.parse_args(list(argv)))

    (local,) = _warnings(caplog, broker("--worker-host", "127.0.0.1"))
    assert "on 127.0.0.1 take no keys: any process on this host can join as a worker" in local
    (open_,) = _warnings(caplog, broker("--worker-host", "0.0.0.0"))
    assert "on 0.0.0.0 take no keys: anyone who reaches them can join" in open_ and "--worker-curve-secret" in open_
    assert _warnings(caplog, broker("--worker-host", "0.0.0.0", *workers.broker_flags())) == []

    def worker(*argv: str) -> Callable[[], object]:
        return lambda: join_keys(parse_args(["--fixed-reply", *argv]))

    assert _warnings(caplog, worker("--join", "127.0.0.1:5557")) == []
    (plain,) = _warnings(caplog, worker("--join", "tcp://10.1.2.3:5557"))
    assert "link to the broker at tcp://10.1.2.3:5557 is plain" in plain
    assert _warnings(caplog, worker("--join", "tcp://10.1.2.3:5557", *workers.join_flags("worker"))) == []
    keys = join_keys(parse_args(["--join", "10.1.2.3:5557", *workers.join_flags("worker")]))
    assert keys is not None and keys.server_public == load_public(workers.root / "broker.key")
    assert (keys.public, keys.secret) == load_pair(workers.root / "worker.key_secret")


WORKER_CURVE = ["--worker-curve-secret", "s", "--worker-curve-clients", "d"]


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["--worker-curve-secret", "s"], "--worker-curve-secret and --worker-curve-clients go together"),
        (["--workers", "1", *WORKER_CURVE], "protects a front host's --worker-port"),
        (["--worker-port", "1", *WORKER_CURVE], "protects a front host's --worker-port"),
        (["--join", "h:1", "--join-curve-key", "k"], "--join-curve-server-key and --join-curve-key go together"),
        (["--join-curve-server-key", "s", "--join-curve-key", "k"], "they go with --join"),
    ],
)
def test_worker_link_flags_that_go_together(argv, error, capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2
    assert error in capsys.readouterr().err


def test_one_folder_cannot_be_both_allow_lists_and_a_bad_key_is_a_start_up_error(tmp_path, caplog):
    robots: Keys = make_keys(tmp_path / "robots")
    same = ["--worker-curve-secret", str(robots.server_secret), "--worker-curve-clients", str(robots.clients)]
    with pytest.raises(CurveError, match="also the robots' allow-list"):
        broker_cli.settings_from(broker_cli.build_parser().parse_args([*robots.server_flags(), *same]))
    missing = ["--worker-curve-secret", str(tmp_path / "none.key_secret"), "--worker-curve-clients", "clients"]
    ports = ["--router-port", "0", "--pub-port", "0"]
    with caplog.at_level(logging.ERROR, logger="runtime.fleet.broker_main"):
        assert broker_cli.main([*ports, *missing]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "none.key_secret: no such key file" in errors[0]
