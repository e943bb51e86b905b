"""A front host whose workers are Ray replicas (`--ray`): the keys, the replicas' command line, the
wait for them to join, the scale-by-load loop, and their end with the front host.

Imported only with `--ray` (it imports `ray`). The broker, the gateways and the public endpoints
are the front host's as without Ray (`runtime.fleet.front`); only who starts the workers changes.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

import ray

from runtime.fleet.autoscale import Autoscaler, Decision, ScaleRule
from runtime.fleet.broker import Broker
from runtime.fleet.ray_cluster import RayReplicas, ReplicaKeys, ReplicaSpec, connect, make_keys, wait_placed
from transport import curve
from transport.messages import INFER, SUBTASK

log = logging.getLogger(__name__)

PLACE_TIMEOUT_S = 600.0  # Ray may have to wait for the cluster's autoscaler to bring a machine
SCALE_PERIOD_S = 1.0


def rule(args: argparse.Namespace) -> ScaleRule:
    low = args.min_replicas or args.replicas
    high = args.max_replicas or args.replicas
    return ScaleRule(low, high, args.scale_wait_ms, args.scale_sustain_s, args.scale_idle_s)


def replica_keys(args: argparse.Namespace, ipc_dir: str) -> tuple[curve.ServerKeys, list[ReplicaKeys]]:
    """The broker's workers'-side keys allowing exactly the replica slots', made in the front host's
    private folder; one slot per replica the fleet may grow to."""
    secret, allowed, slots = make_keys(Path(ipc_dir, "ray-keys"), rule(args).max_replicas)
    return curve.load_server_keys(secret, allowed), slots


def join_endpoint(broker: Broker) -> str:
    """Where replicas on any node reach the broker: its TCP workers' endpoint, with this node's
    address when it is bound on every interface."""
    endpoint = broker.remote_backend_endpoint
    assert endpoint is not None
    host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    if host in ("0.0.0.0", "*", "[::]", "::"):
        host = ray.util.get_node_ip_address()
    return f"tcp://{host}:{port}"


class RayFleet:
    """The replicas, started and scaled from the front host's event loop (Ray's calls block: each
    runs on a thread)."""

    def __init__(self, args: argparse.Namespace, worker_argv: list[str], keys: list[ReplicaKeys]):
        self.args = args
        self.broker: Broker | None = None
        self.autoscaler = Autoscaler(rule(args))
        self._worker_argv = worker_argv
        self._keys = keys
        self.replicas: RayReplicas | None = None

    def observe(self, internal: bool, robot: str, type_: str, outcome: str, seconds: float) -> None:
        """A broker `Observer`: the model requests' time at the workers feed the scale rule."""
        if type_ in (INFER, SUBTASK):
            self.autoscaler.observe(seconds)

    async def start(self, broker: Broker) -> None:
        """Connects to Ray and starts `--replicas` replicas that join `broker` (bound and running)."""
        self.broker = broker
        connect(self.args.ray)  # on the main thread, as Ray wants its driver set up (a few seconds, before serving)
        join = ("--join", join_endpoint(broker))
        command = (sys.executable, "-m", "runtime.policy_server", *join, *self._worker_argv)
        spec = ReplicaSpec(command, self.args.cpus_per_replica, self.args.gpus_per_replica)
        self.replicas = RayReplicas(spec, self._keys)
        for _ in range(self.args.replicas):
            await asyncio.to_thread(self.replicas.add)
        placed = await asyncio.to_thread(wait_placed, self.replicas, PLACE_TIMEOUT_S)
        for slot, where in sorted(placed.items()):
            log.info("replica ray-%d runs on node %s (%s), pid %d", slot, where["node_ip"], where["node_id"][:12],
                     where["pid"])  # fmt: skip

    def _joined(self) -> dict[str, int]:
        """The replicas joined to the broker: each one's name and requests routed to it so far."""
        assert self.broker is not None
        return {w.name: w.routed for w in list(self.broker.table.workers.values()) if w.name.startswith("ray-")}

    async def wait_joined(self, count: int) -> None:
        while len(self._joined()) < count:
            await asyncio.sleep(0.05)

    async def run_scaling(self) -> None:
        """Applies the scale rule every second."""
        while True:
            await asyncio.sleep(SCALE_PERIOD_S)
            await self.scale_once()

    async def scale_once(self) -> Decision | None:
        """One look at the load: a replica added or removed as the rule decides, logged with its reason."""
        assert self.replicas is not None
        decision = self.autoscaler.decide(self._joined(), len(self.replicas.actors))
        if decision is None:
            return None
        if decision.action == "add":
            slot = await asyncio.to_thread(self.replicas.add)
            log.info("scaling: adding replica ray-%d: %s", slot, decision.reason)
        else:
            assert decision.replica is not None
            slot = int(decision.replica.removeprefix("ray-").partition("@")[0])  # named by `Replica`
            log.info("scaling: removing replica ray-%d: %s", slot, decision.reason)
            await asyncio.to_thread(self.replicas.remove, slot)
        return decision

    async def close(self) -> None:
        """Removes every replica (their workers leave the broker), then the Ray instance it started."""
        if self.replicas is not None:
            await asyncio.to_thread(self.replicas.close)
        if ray.is_initialized():  # stops the instance it started; else only leaves the cluster
            ray.shutdown()  # on the main thread too: Ray's driver aborts when torn down from another one
