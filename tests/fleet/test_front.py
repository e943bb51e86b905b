"""The fleet's command line: what a front host passes on to its workers, and what it refuses."""

from __future__ import annotations

import pytest

from runtime.fleet.front import FRONT_ONLY
from runtime.fleet.workers import worker_argv, worker_specs
from runtime.policy_server.main import build_parser, parse_args


def test_workers_get_the_model_and_serving_flags_and_none_of_the_front_hosts():
    argv = [
        "--workers", "2", "--host=0.0.0.0", "--router-port", "6000", "--config", "pi05_tiny", "--fixed-reply",
        "--ws-port=0", "--max-batch", "4", "--curve-secret", "s.key_secret", "--curve-clients", "dir",
        "--deadline=7", "--log-level", "DEBUG",
    ]  # fmt: skip
    assert worker_argv(build_parser(), argv, FRONT_ONLY) == [
        "--config", "pi05_tiny", "--fixed-reply", "--max-batch", "4", "--deadline=7", "--log-level", "DEBUG",
    ]  # fmt: skip
    assert parse_args(argv).worker_argv == worker_argv(build_parser(), argv, FRONT_ONLY)


def test_each_worker_gets_its_device():
    gpus = worker_specs(0, (2, 5))
    assert [(s.name, s.env["CUDA_VISIBLE_DEVICES"], s.argv) for s in gpus] == [("gpu2", "2", ()), ("gpu5", "5", ())]
    cpus = worker_specs(3, ())
    assert [s.name for s in cpus] == ["cpu0", "cpu1", "cpu2"]
    assert all(s.argv[0] == "--cpus" and "intra_op_parallelism_threads=1" in s.env["XLA_FLAGS"] for s in cpus)


@pytest.mark.parametrize(
    "argv",
    [
        ["--workers", "2", "--gpu-ids", "0"],
        ["--workers", "2", "--join", "tcp://h:1"],
        ["--join", "not an endpoint"],
        ["--join", "tcp://h:1", "--demo"],
        ["--gpu-ids", "0,0"],
        ["--gpu-ids", "a"],
        ["--workers", "0"],
        ["--cpus", "4096"],
    ],
)
def test_contradictory_fleet_flags_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2


def test_a_worker_binds_no_public_endpoint():
    args = parse_args(["--join", "127.0.0.1:5557"])
    assert args.join == "tcp://127.0.0.1:5557"
    assert (args.router_port, args.pub_port, args.ws_port, args.openpi_port) == (0, 0, 0, 0)
