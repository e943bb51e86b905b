"""The Ray fleet scenario, run in a network namespace of its own (`tests/fleet/test_ray_fleet.py`):
Ray on this machine listens on the machine's interface and looks for a public resolver unless
loopback is all there is, and the tests reach 127.0.0.1 only.

`python -m tests.support.ray_scenario OUT.json`: a front host with `--ray local --replicas 2` on the
tiny model, 4 control loops at once; one replica's actor process is killed with SIGKILL mid-run;
Ray restarts it, it joins again and serves new robots; the loops go on; the front host stops. What
happened is written to OUT.json for the test to judge (each wait has a deadline: nothing hangs).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from robots.sim import SimArm
from runtime.robot.chunk_buffer import BufferSettings
from runtime.robot.control_loop import ControlLoop, LoopSettings
from tests.support.eventually import eventually
from tests.support.server_process import ServerProcess
from transport.zmq_client import PolicyClient

CAP_S = 300.0  # failure detection only
LOOPS = 4
HZ = 25.0
RAY_PROCESSES = ("raylet", "gcs_server", "ray::", "--worker-name ray-")


def processes(*needles: str) -> dict[int, str]:
    """This machine's processes whose command line holds one of `needles`, by pid."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(n in cmdline for n in needles) and int(entry.name) != os.getpid():
            found[int(entry.name)] = cmdline
    return found


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def workers(router: str) -> dict[str, dict[str, Any]]:
    with PolicyClient(router, "probe", timeout_s=30) as probe:
        return {w["name"]: w for w in probe.ping()["broker"]["workers"]}


class Report(dict):
    """What happened so far, written to `out` at each step: a scenario cut short by the test's
    timeout still says how far it got and when."""

    def __init__(self, out: Path):
        super().__init__()
        self._out, self._start = out, time.monotonic()

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        self.setdefault("elapsed_s", {})[key] = round(time.monotonic() - self._start, 1)
        self._out.write_text(json.dumps(self, indent=1, default=str))


def run(out: Path) -> None:
    report = Report(out)
    server = ServerProcess("--ray", "local", "--replicas", "2", gateways=False)
    server.start(CAP_S)
    report["started"] = True
    try:
        report["ready"] = server.ready
        report["workers_at_start"] = sorted(workers(server.router))
        loops = [
            ControlLoop(
                SimArm(control_hz=HZ, seed=i),
                PolicyClient(server.router, f"arm-{i}", timeout_s=CAP_S),
                LoopSettings(hz=HZ, buffer=BufferSettings(request_when_left=25), subtask_mode="off",
                             request_timeout_s=10.0),
                server.pub,
            )
            for i in range(LOOPS)
        ]  # fmt: skip
        summaries: dict[int, dict] = {}
        threads = [threading.Thread(target=lambda i=i: summaries.update({i: loops[i].run()})) for i in range(LOOPS)]
        for t in threads:
            t.start()
        report["spread"] = eventually(lambda: all(w["robots"] > 0 for w in workers(server.router).values()), CAP_S)
        report["all_running"] = eventually(lambda: all(lp.buffer.metrics.chunks_received >= 3 for lp in loops), CAP_S)
        before = {i: loop.buffer.metrics.chunks_received for i, loop in enumerate(loops)}
        victim_name, victim = sorted(workers(server.router).items())[0]
        (worker_pid,) = [p for p, cmd in processes(f"--worker-name {victim_name}").items() if "runtime.policy" in cmd]
        actor_pid = parent_of(worker_pid)
        report["killed"] = {"name": victim_name, "actor_pid": actor_pid, "robots": victim["robots"]}
        os.kill(actor_pid, signal.SIGKILL)
        killed_at = time.monotonic()
        report["left"] = eventually(lambda: victim_name not in workers(server.router), CAP_S)
        report["rejoined"] = eventually(lambda: victim_name in workers(server.router), CAP_S)
        report["rejoin_s"] = time.monotonic() - killed_at
        with PolicyClient(server.router, "probe", timeout_s=30) as probe:
            report["robots_moved"] = probe.ping()["broker"]["robots_moved"]
        report["restarted_actor"] = any(
            parent_of(p) != actor_pid for p in processes(f"--worker-name {victim_name}") if p != worker_pid
        )
        # New robots go to the least-loaded worker: the restarted one serves them.
        with PolicyClient(server.router, "newcomer", timeout_s=CAP_S) as newcomer:
            image = {"base_0_rgb": np.zeros((224, 224, 3), np.uint8)}
            newcomer.infer(image, "pick up the block", generate_subtask=False)
        report["restarted_serves"] = workers(server.router)[victim_name]["robots"] >= 1
        after_kill = {i: loop.buffer.metrics.chunks_received for i, loop in enumerate(loops)}
        report["chunks_grew"] = eventually(
            lambda: all(loop.buffer.metrics.chunks_received > after_kill[i] + 5 for i, loop in enumerate(loops)),
            CAP_S,
        )
        for loop in loops:
            loop.stop()
        for t in threads:
            t.join(CAP_S)
        report["loops_ended"] = not any(t.is_alive() for t in threads)
        report["summaries"] = {
            i: {k: s[k] for k in ("chunks_received", "outages", "underruns", "ticks")} for i, s in summaries.items()
        }
        report["chunks_before_kill"] = before
        for loop in loops:
            loop.client.close()
    finally:
        report["exit_code"] = server.stop(signal.SIGTERM, timeout_s=CAP_S)
        report["log_tail"] = server.lines[-60:]
    report["left_behind"] = eventually(lambda: not processes(*RAY_PROCESSES), 30.0) or processes(*RAY_PROCESSES)
    report["log_names_nodes"] = [line for line in server.lines if "runs on node" in line]


if __name__ == "__main__":
    # Stopped (the test's deadline): `run`'s finally stops the front host, which takes Ray down with it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    run(Path(sys.argv[1]))
