"""A front host's policy workers as Ray actors (`--ray ADDRESS --replicas N`): placed, restarted and
scaled by the cluster instead of by hand.

Ray does the lifecycle; the broker keeps the robots' path. Each replica is a Ray actor (`Replica`)
that Ray schedules by its resources (`--cpus-per-replica`, `--gpus-per-replica`) wherever the cluster
has them, and restarts when its process dies (`max_restarts=-1`). The actor runs the same worker as
`--join` (`python -m runtime.policy_server --join tcp://FRONT:PORT` with this command's model and
serving flags) as its child, which dies with it (`--die-with-parent`); when that child exits the
actor exits too, so Ray restarts either failure. The worker joins the broker over TCP and is sent
robots like any worker; a replica that dies loses its robots to the others meanwhile, as a
hand-started worker does. Robots' requests never travel through Ray: Ray's own RPC would add a hop
and a serialization of every image (`docs/benchmarks.md`).

The link is CURVE: the front host makes a key pair for the broker's workers' side and one per
replica slot (replica `i` keeps its key across restarts) in its private folder, allows exactly those,
and hands each actor its slot's secret key and the broker's public key through Ray (whose token
authentication stays on). The actor writes them where only its user can read them.

`ray` is imported only here, and this module only with `--ray`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import ray

from runtime.fleet.workers import cpu_env
from runtime.keys import create_pair
from transport.curve import PUBLIC_SUFFIX, SECRET_SUFFIX

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 10.0


def connect(address: str) -> None:
    """Joins the Ray cluster at `address` (`auto`, `ray://HOST:PORT`), or starts one on this host
    (`local`, for trying it; `ray.shutdown()` stops it again). On the main thread: `ray.init` takes
    over SIGINT and SIGTERM (its driver exits on them, mid-loop, and its core aborts), so the
    process's own handlers (the front host's orderly stop) are put back after it."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        if address == "local":
            ray.init(include_dashboard=False, log_to_driver=True)
        else:
            ray.init(address=address, log_to_driver=True)
    finally:
        for sig, handler in saved.items():
            if handler is not None:
                signal.signal(sig, handler)
    where = "started a local Ray instance" if address == "local" else f"joined the Ray cluster at {address}"
    log.info("%s (%s CPUs, %s GPUs)", where, *_resources())


def _resources() -> tuple[float, float]:
    resources = ray.cluster_resources()
    return resources.get("CPU", 0), resources.get("GPU", 0)


@dataclasses.dataclass(frozen=True)
class ReplicaKeys:
    """One replica slot's CURVE material, as text: the broker's public key and the slot's pair."""

    broker_public: str
    secret: str  # the slot's `.key_secret` file (holds its public key too)


def make_keys(folder: Path, slots: int) -> tuple[Path, Path, list[ReplicaKeys]]:
    """The broker's workers'-side pair and one pair per replica slot, in `folder` (private): the
    broker's secret file, the allow-list folder (the slots' public keys alone), and each slot's keys."""
    broker_public, broker_secret = create_pair(folder, "broker")
    allowed = folder / "replicas"
    slots_keys = []
    for i in range(slots):
        public, secret = create_pair(folder / "slots", f"replica-{i}")
        allowed.mkdir(mode=0o700, exist_ok=True)
        (allowed / public.name).write_bytes(public.read_bytes())
        slots_keys.append(ReplicaKeys(broker_public.read_text(), secret.read_text()))
    return broker_secret, allowed, slots_keys


@ray.remote(max_restarts=-1, max_task_retries=0)
class Replica:
    """One policy worker process on whichever node Ray placed this actor; restarted by Ray."""

    def __init__(self, name: str, command: list[str], keys: ReplicaKeys, cpu: bool):
        self.node_ip = ray.util.get_node_ip_address()
        self.name = f"{name}@{self.node_ip}"
        self._dir = tempfile.mkdtemp(prefix="pi05-replica-")  # 0700: the keys stay this user's
        server_key, own_key = Path(self._dir, f"broker{PUBLIC_SUFFIX}"), Path(self._dir, f"own{SECRET_SUFFIX}")
        server_key.write_text(keys.broker_public)
        own_key.write_text(keys.secret)
        os.chmod(own_key, 0o600)
        argv = [*command, "--worker-name", self.name, "--die-with-parent"]
        argv += ["--join-curve-server-key", str(server_key), "--join-curve-key", str(own_key)]
        self._stopping = False
        # A CPU replica uses one XLA thread (as a --workers worker does); Ray sets a GPU one's devices.
        env = {**os.environ, **cpu_env(os.environ)} if cpu else None
        self._proc = subprocess.Popen(argv, env=env)
        threading.Thread(target=self._exit_with_worker, name="replica-watch", daemon=True).start()

    def _exit_with_worker(self) -> None:
        """The worker exited on its own: so does this actor, and Ray starts both again."""
        code = self._proc.wait()
        if not self._stopping:
            print(f"replica {self.name}: its worker exited with {code}; the replica exits for Ray to restart it",
                  file=sys.stderr, flush=True)  # fmt: skip
            os._exit(1)

    def where(self) -> dict[str, Any]:
        """The node, the actor's pid and its worker's: what the logs and the tests name."""
        return {
            "name": self.name,
            "node_ip": self.node_ip,
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "worker_pid": self._proc.pid,
        }

    def stop(self) -> int | None:
        """Ends the worker as a service manager does (it says DISCONNECT to the broker), then kills it
        if it hangs. SIGTERM, not SIGINT: Ray's actor threads block SIGINT, and the child inherits that."""
        self._stopping = True
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        return self._proc.wait()


@dataclasses.dataclass(frozen=True)
class ReplicaSpec:
    """What every replica runs and needs: the worker's command (`--join ...` and the model and
    serving flags) and the Ray resources it is placed by."""

    command: tuple[str, ...]
    cpus: float = 1.0
    gpus: float = 0.0


class RayReplicas:
    """The replicas in slots 0..max-1 (a slot's key is its own); `scale_to` adds or removes them."""

    def __init__(self, spec: ReplicaSpec, keys: list[ReplicaKeys]):
        self._spec = spec
        self._keys = keys
        self.actors: dict[int, Any] = {}  # slot -> actor handle

    def add(self) -> int:
        """Starts a replica in the lowest free slot; its slot."""
        slot = next(i for i in range(len(self._keys)) if i not in self.actors)
        resources = Replica.options(num_cpus=self._spec.cpus, num_gpus=self._spec.gpus)
        actor = resources.remote(f"ray-{slot}", list(self._spec.command), self._keys[slot], not self._spec.gpus)
        self.actors[slot] = actor
        return slot

    def remove(self, slot: int) -> None:
        """Stops the replica in `slot` (its worker leaves the broker first) and frees its resources."""
        actor = self.actors.pop(slot)
        try:
            ray.get(actor.stop.remote(), timeout=STOP_TIMEOUT_S + 5)
        except (ray.exceptions.RayError, TimeoutError) as e:
            log.warning("replica ray-%d did not stop cleanly (%s); killing it", slot, type(e).__name__)
        ray.kill(actor, no_restart=True)

    def where(self, timeout_s: float = 60.0) -> dict[int, dict[str, Any]]:
        """Each replica's node and processes (the replicas being restarted are left out)."""
        refs = {slot: actor.where.remote() for slot, actor in self.actors.items()}
        found = {}
        for slot, ref in refs.items():
            try:
                found[slot] = ray.get(ref, timeout=timeout_s)
            except (ray.exceptions.RayError, TimeoutError):
                continue
        return found

    def close(self) -> None:
        for slot in list(self.actors):
            self.remove(slot)


def wait_placed(replicas: RayReplicas, timeout_s: float) -> dict[int, dict[str, Any]]:
    """Waits for every replica to be running (Ray may first have to find room); where each runs."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = replicas.where(timeout_s=max(1.0, deadline - time.monotonic()))
        if len(found) == len(replicas.actors) or time.monotonic() > deadline:
            return found
        time.sleep(0.2)
